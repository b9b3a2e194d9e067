// The tests' HTTP client: cpp-httplib as Debian builds it. libcpp-httplib.so is compiled with
// OpenSSL, zlib and Brotli support, which changes the layout of its classes (httplib::Client,
// Request, ...): every file that includes <httplib.h> must see the same macros (cpp-httplib.pc's
// Cflags) or objects are shared with the library at the wrong size. Include this header instead
// of <httplib.h>.
#pragma once

#ifndef CPPHTTPLIB_OPENSSL_SUPPORT
#define CPPHTTPLIB_OPENSSL_SUPPORT
#endif
#ifndef CPPHTTPLIB_ZLIB_SUPPORT
#define CPPHTTPLIB_ZLIB_SUPPORT
#endif
#ifndef CPPHTTPLIB_BROTLI_SUPPORT
#define CPPHTTPLIB_BROTLI_SUPPORT
#endif

#include <httplib.h>
