// Instruction sets of the running CPU, read once; MOESERVE_ISA=scalar|avx2|avx512 caps the choice.
#pragma once

namespace moeserve {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The best instruction set both the CPU and MOESERVE_ISA allow.
Isa detected_isa();
const char* isa_name(Isa isa);

}  // namespace moeserve
