// Errors returned to HTTP clients as OpenAI's error object:
//   {"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..." | null}}
// Thrown anywhere while a request is handled; the route wrapper turns it into the response.
#pragma once

#include <stdexcept>
#include <string>

namespace moeserve::server {

class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "")
      : std::runtime_error(message),
        status(status),
        param(std::move(param)),
        code(std::move(code)),
        type(type.empty() ? default_type(status) : std::move(type)) {}

  int status;         // HTTP status
  std::string param;  // the request field at fault, "" for none (null)
  std::string code;   // machine-readable code, "" for none (null)
  std::string type;   // OpenAI error type

  static std::string default_type(int status) {
    if (status >= 500) return "server_error";
    if (status == 401) return "authentication_error";
    if (status == 404) return "not_found_error";
    if (status == 429) return "rate_limit_error";
    return "invalid_request_error";
  }
};

// 400 naming the field at fault.
[[noreturn]] inline void bad_request(const std::string& param, const std::string& message,
                                     const std::string& code = "") {
  throw ApiError(400, message, param, code);
}

// The JSON body of an error response.
std::string error_body(const std::string& message, const std::string& type,
                       const std::string& param, const std::string& code);
inline std::string error_body(const ApiError& e) {
  return error_body(e.what(), e.type, e.param, e.code);
}

}  // namespace moeserve::server
