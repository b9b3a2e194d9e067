// Instruction sets of the running CPU, read once; MOESERVE_ISA=scalar|avx2|avx512|avx512bf16
// caps the choice. Avx512Bf16 is AVX-512 plus the bf16 dot-product instruction (vdpbf16ps),
// which only bf16-precision products use (kernels.h); kernels::active_isa says whether it
// passed its check.
#pragma once

namespace moeserve {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// The best instruction set both the CPU and MOESERVE_ISA allow.
Isa detected_isa();
const char* isa_name(Isa isa);

}  // namespace moeserve
