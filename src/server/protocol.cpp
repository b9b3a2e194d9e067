#include "server/protocol.h"

#include <cmath>
#include <limits>

#include "server/api_error.h"

namespace moeserve::server {

using nlohmann::json;

namespace {

const char* kind_of(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
      return "an integer";
    case json::value_t::number_float:
      return "a number";
    default:
      return "an unsupported value";
  }
}

[[noreturn]] void wrong_type(const std::string& name, const char* expected, const json& got) {
  bad_request(name, "Invalid type for '" + name + "': expected " + expected + ", but got " +
                        kind_of(got) + " instead.");
}

// The field's value, or nullptr when it is absent or null (OpenAI treats null as "not given").
const json* field(const json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::optional<bool> get_bool(const json& obj, const char* key) {
  const json* v = field(obj, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) wrong_type(key, "a boolean", *v);
  return v->get<bool>();
}

std::optional<std::string> get_string(const json& obj, const char* key) {
  const json* v = field(obj, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) wrong_type(key, "a string", *v);
  return v->get<std::string>();
}

std::optional<double> get_number(const json& obj, const char* key, double lo, double hi) {
  const json* v = field(obj, key);
  if (!v) return std::nullopt;
  if (!v->is_number()) wrong_type(key, "a number", *v);
  const double d = v->get<double>();
  if (!std::isfinite(d) || d < lo || d > hi)
    bad_request(key, "'" + std::string(key) + "' must be between " + json(lo).dump() + " and " +
                         json(hi).dump() + ", got " + v->dump() + ".");
  return d;
}

// An integer within [lo, hi] (a JSON number with a fractional part or an exponent is refused).
int64_t as_int(const json& v, const std::string& name, int64_t lo, int64_t hi) {
  if (!v.is_number_integer()) wrong_type(name, "an integer", v);
  bool ok;
  int64_t x = 0;
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    ok = hi >= 0 && u <= static_cast<uint64_t>(hi) && (lo <= 0 || u >= static_cast<uint64_t>(lo));
    x = ok ? static_cast<int64_t>(u) : 0;
  } else {
    x = v.get<int64_t>();
    ok = x >= lo && x <= hi;
  }
  if (!ok)
    bad_request(name, "'" + name + "' must be an integer between " + std::to_string(lo) + " and " +
                          std::to_string(hi) + ", got " + v.dump() + ".");
  return x;
}

std::optional<int64_t> get_int(const json& obj, const char* key, int64_t lo, int64_t hi) {
  const json* v = field(obj, key);
  if (!v) return std::nullopt;
  return as_int(*v, key, lo, hi);
}

// Penalties, logit_bias, min_tokens and n.
void parse_controls(const json& obj, const ProtocolLimits& lim, GenRequest& r) {
  r.presence_penalty = get_number(obj, "presence_penalty", -2.0, 2.0).value_or(0.0);
  r.frequency_penalty = get_number(obj, "frequency_penalty", -2.0, 2.0).value_or(0.0);
  r.repetition_penalty = get_number(obj, "repetition_penalty", 0.0, 1e9).value_or(1.0);
  if (r.repetition_penalty <= 0.0)
    bad_request("repetition_penalty", "'repetition_penalty' must be greater than 0.");
  if (const json* v = field(obj, "logit_bias")) {
    if (!v->is_object()) wrong_type("logit_bias", "an object", *v);
    if (v->size() > lim.max_logit_bias)
      bad_request("logit_bias", "'logit_bias' may have at most " +
                                    std::to_string(lim.max_logit_bias) + " entries.");
    for (auto it = v->begin(); it != v->end(); ++it) {
      const std::string& key = it.key();
      const bool digits = !key.empty() && key.size() <= 10 &&
                          key.find_first_not_of("0123456789") == std::string::npos;
      if (!digits || std::stoll(key) > std::numeric_limits<int32_t>::max())
        bad_request("logit_bias", "Invalid key in 'logit_bias': '" + key +
                                      "' is not a token id (keys are token ids as strings).");
      if (!it->is_number()) wrong_type("logit_bias", "a number", *it);
      const double b = it->get<double>();
      if (!std::isfinite(b) || b < -100.0 || b > 100.0)
        bad_request("logit_bias", "Invalid value for 'logit_bias[" + key +
                                      "]': the bias must be between -100 and 100, got " +
                                      it->dump() + ".");
      r.logit_bias.emplace_back(static_cast<int32_t>(std::stoll(key)), static_cast<float>(b));
    }
  }
  r.min_tokens = get_int(obj, "min_tokens", 0, std::numeric_limits<int32_t>::max()).value_or(0);
  if (r.max_tokens && r.min_tokens > *r.max_tokens)
    bad_request("min_tokens", "'min_tokens' (" + std::to_string(r.min_tokens) +
                                  ") must not be more than 'max_tokens' (" +
                                  std::to_string(*r.max_tokens) + ").");
  r.n = get_int(obj, "n", 1, lim.max_n).value_or(1);
  if (auto b = get_int(obj, "best_of", std::numeric_limits<int64_t>::min(),
                       std::numeric_limits<int64_t>::max());
      b && *b != r.n)
    bad_request("best_of", "'best_of' is not supported other than equal to 'n'.");
}

// Options moeserve does not implement: accepted only at their neutral value.
void require_neutral(const json& obj) {
  if (get_bool(obj, "echo").value_or(false)) bad_request("echo", "'echo' is not supported.");
  if (auto s = get_string(obj, "suffix"); s && !s->empty())
    bad_request("suffix", "'suffix' is not supported.");
  if (const json* v = field(obj, "functions")) {
    if (!v->is_array()) wrong_type("functions", "an array", *v);
    if (!v->empty()) bad_request("functions", "Function calling is not supported.");
  }
  (void)get_string(obj, "user");
}

// response_format: text, json_object, or json_schema {name, schema, strict}. The schema is taken
// from `body` again with its keys in order (objects are generated in the order of their
// properties).
void parse_response_format(const json& obj, std::string_view body, GenRequest& r) {
  const json* v = field(obj, "response_format");
  if (!v) return;
  if (!v->is_object()) wrong_type("response_format", "an object", *v);
  const json* t = field(*v, "type");
  if (!t || !t->is_string())
    bad_request("response_format", "'response_format.type' is a required string.");
  const std::string type = t->get<std::string>();
  if (type == "text") return;
  if (type == "json_object") {
    r.json_output = true;
    return;
  }
  if (type != "json_schema")
    bad_request("response_format", "Invalid value for 'response_format.type': '" + type +
                                       "'. Supported values are text, json_object and "
                                       "json_schema.");
  const json* js = field(*v, "json_schema");
  if (!js || !js->is_object())
    bad_request("response_format", "'response_format.json_schema' is a required object.");
  if (const json* name = field(*js, "name"); name && !name->is_string())
    wrong_type("response_format.json_schema.name", "a string", *name);
  if (const json* st = field(*js, "strict"); st && !st->is_boolean())
    wrong_type("response_format.json_schema.strict", "a boolean", *st);
  r.json_output = true;
  const json* schema = field(*js, "schema");
  if (!schema) return;  // any JSON object
  if (!schema->is_object() && !schema->is_boolean())
    wrong_type("response_format.json_schema.schema", "an object", *schema);
  const auto ordered = nlohmann::ordered_json::parse(body, nullptr, false);
  r.json_schema = ordered["response_format"]["json_schema"]["schema"];
}

// tools and tool_choice (chat). The parameters' schemas are taken from `body` again with their
// keys in order.
void parse_tools(const json& obj, std::string_view body, GenRequest& r) {
  const json* v = field(obj, "tools");
  const json* choice = field(obj, "tool_choice");
  if (v) {
    if (!v->is_array()) wrong_type("tools", "an array", *v);
    if (v->size() > 128) bad_request("tools", "At most 128 tools are supported.");
  }
  if (r.endpoint != Endpoint::Chat) {
    if ((v && !v->empty()) || choice)
      bad_request(v ? "tools" : "tool_choice", "Tools are only supported on /v1/chat/completions.");
    return;
  }
  if (v && !v->empty()) {
    const auto ordered = nlohmann::ordered_json::parse(body, nullptr, false);
    r.tools_json = ordered["tools"];
    for (size_t i = 0; i < v->size(); ++i) {
      const std::string at = "tools[" + std::to_string(i) + "]";
      const json& t = (*v)[i];
      if (!t.is_object()) wrong_type(at, "an object", t);
      const json* type = field(t, "type");
      if (!type || *type != "function")
        bad_request(at + ".type", "Only tools of type 'function' are supported.");
      const json* fn = field(t, "function");
      if (!fn || !fn->is_object())
        bad_request(at + ".function", "'function' is a required object.");
      const json* name = field(*fn, "name");
      if (!name || !name->is_string() || name->get<std::string>().empty())
        bad_request(at + ".function.name", "A function needs a non-empty 'name'.");
      ToolDef d;
      d.name = name->get<std::string>();
      if (d.name.find_first_of("\n\r") != std::string::npos)
        bad_request(at + ".function.name", "A function name may not hold a line break.");
      for (const ToolDef& o : r.tools)
        if (o.name == d.name)
          bad_request(at + ".function.name", "Two tools named '" + d.name + "'.");
      if (const json* params = field(*fn, "parameters")) {
        if (!params->is_object()) wrong_type(at + ".function.parameters", "an object", *params);
        d.parameters = ordered["tools"][i]["function"]["parameters"];
      }
      r.tools.push_back(std::move(d));
    }
    r.tool_choice = "auto";
  }
  if (!choice) return;
  if (choice->is_string()) {
    const std::string c = choice->get<std::string>();
    if (c != "none" && c != "auto" && c != "required")
      bad_request("tool_choice", "Invalid value for 'tool_choice': '" + c +
                                     "'. Supported values are none, auto, required, or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}.");
    if (c != "none" && r.tools.empty())
      bad_request("tool_choice", "'tool_choice' " + c + " needs 'tools'.");
    r.tool_choice = c;
    return;
  }
  if (!choice->is_object()) wrong_type("tool_choice", "a string or an object", *choice);
  const json* fn = field(*choice, "function");
  const json* name = fn && fn->is_object() ? field(*fn, "name") : nullptr;
  if (!name || !name->is_string())
    bad_request("tool_choice",
                "'tool_choice' must name a function: {\"type\": \"function\", "
                "\"function\": {\"name\": ...}}.");
  r.tool_choice_name = name->get<std::string>();
  bool found = false;
  for (const ToolDef& t : r.tools) found |= t.name == r.tool_choice_name;
  if (!found)
    bad_request("tool_choice",
                "'tool_choice' names '" + r.tool_choice_name + "', which is not one of the tools.");
  r.tool_choice = "function";
}

void parse_stop(const json& obj, const ProtocolLimits& lim, GenRequest& r) {
  if (const json* v = field(obj, "stop")) {
    std::vector<std::string> list;
    if (v->is_string()) {
      list.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      if (static_cast<int>(v->size()) > lim.max_stop_strings)
        bad_request("stop", "At most " + std::to_string(lim.max_stop_strings) +
                                " stop sequences are supported.");
      for (const json& s : *v) {
        if (!s.is_string()) wrong_type("stop", "a string or an array of strings", s);
        list.push_back(s.get<std::string>());
      }
    } else {
      wrong_type("stop", "a string or an array of strings", *v);
    }
    for (auto& s : list) {
      if (s.size() > lim.max_stop_length)
        bad_request("stop", "Stop sequences are limited to " + std::to_string(lim.max_stop_length) +
                                " bytes.");
      if (!s.empty()) r.stop.push_back(std::move(s));  // "" never matches anything useful
    }
  }
  if (const json* v = field(obj, "stop_token_ids")) {
    if (!v->is_array()) wrong_type("stop_token_ids", "an array of integers", *v);
    if (static_cast<int>(v->size()) > lim.max_stop_strings * 4)
      bad_request("stop_token_ids", "Too many stop_token_ids.");
    for (const json& id : *v)
      r.stop_token_ids.push_back(static_cast<int32_t>(
          as_int(id, "stop_token_ids", 0, std::numeric_limits<int32_t>::max())));
  }
}

void parse_sampling(const json& obj, const ProtocolLimits& lim, GenRequest& r) {
  r.model = get_string(obj, "model").value_or("");
  r.stream = get_bool(obj, "stream").value_or(false);
  if (const json* so = field(obj, "stream_options")) {
    if (!so->is_object()) wrong_type("stream_options", "an object", *so);
    if (!r.stream)
      bad_request("stream_options", "'stream_options' is only allowed when 'stream' is true.");
    r.include_usage = get_bool(*so, "include_usage").value_or(false);
  }
  const int64_t kMaxTokens = std::numeric_limits<int32_t>::max();
  auto mt = get_int(obj, "max_tokens", std::numeric_limits<int64_t>::min(), kMaxTokens);
  auto mct = get_int(obj, "max_completion_tokens", std::numeric_limits<int64_t>::min(), kMaxTokens);
  if (mct) {
    if (*mct < 1)
      bad_request("max_completion_tokens", "'max_completion_tokens' must be at least 1.");
    r.max_tokens = mct;
  } else if (mt) {
    if (*mt < 1) bad_request("max_tokens", "'max_tokens' must be at least 1.");
    r.max_tokens = mt;
  }
  r.temperature = get_number(obj, "temperature", 0.0, 2.0).value_or(1.0);
  r.top_p = get_number(obj, "top_p", 0.0, 1.0).value_or(1.0);
  if (r.top_p <= 0.0) bad_request("top_p", "'top_p' must be greater than 0.");
  const int64_t k = get_int(obj, "top_k", -1, std::numeric_limits<int32_t>::max()).value_or(0);
  r.top_k = k < 0 ? 0 : k;
  if (const json* s = field(obj, "seed")) {
    if (!s->is_number_integer()) wrong_type("seed", "an integer", *s);
    r.seed =
        s->is_number_unsigned() ? s->get<uint64_t>() : static_cast<uint64_t>(s->get<int64_t>());
  }
  r.ignore_eos = get_bool(obj, "ignore_eos").value_or(false);
  r.skip_special_tokens = get_bool(obj, "skip_special_tokens").value_or(true);
  parse_stop(obj, lim, r);
  parse_controls(obj, lim, r);
  require_neutral(obj);
}

std::string content_text(const json& c, size_t i) {
  const std::string param = "messages[" + std::to_string(i) + "].content";
  if (c.is_string()) return c.get<std::string>();
  if (!c.is_array()) wrong_type(param, "a string or an array of content parts", c);
  std::string out;
  for (size_t p = 0; p < c.size(); ++p) {
    const json& part = c[p];
    if (!part.is_object()) wrong_type(param, "an array of content parts", part);
    const auto type = get_string(part, "type");
    if (!type || *type != "text")
      bad_request(param, "Only content parts of type 'text' are supported.");
    const auto text = get_string(part, "text");
    if (!text) bad_request(param, "A content part of type 'text' needs a 'text' string.");
    if (!out.empty()) out += "\n";
    out += *text;
  }
  return out;
}

std::vector<ChatMessage> messages_of(const json& obj) {
  std::vector<ChatMessage> out;
  const json* ms = field(obj, "messages");
  if (!ms) bad_request("messages", "'messages' is a required property.");
  if (!ms->is_array()) wrong_type("messages", "an array", *ms);
  if (ms->empty()) bad_request("messages", "'messages' must contain at least one message.");
  for (size_t i = 0; i < ms->size(); ++i) {
    const json& m = (*ms)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) wrong_type(at, "an object", m);
    ChatMessage cm;
    const json* role = field(m, "role");
    if (!role) bad_request(at + ".role", "'" + at + ".role' is a required property.");
    if (!role->is_string()) wrong_type(at + ".role", "a string", *role);
    cm.role = role->get<std::string>();
    if (cm.role != "system" && cm.role != "developer" && cm.role != "user" &&
        cm.role != "assistant" && cm.role != "tool")
      bad_request(at + ".role", "Invalid value for '" + at + ".role': '" + cm.role +
                                    "'. Supported roles are system, developer, user, assistant "
                                    "and tool.");
    if (const json* c = field(m, "content")) {
      cm.content = content_text(*c, i);
    } else if (cm.role != "assistant") {
      bad_request(at + ".content", "'" + at + ".content' is a required property.");
    }
    for (const char* k : {"name", "tool_call_id"})
      if (const json* v = field(m, k)) {
        if (!v->is_string()) wrong_type(at + "." + k, "a string", *v);
        cm.extra[k] = v->get<std::string>();
      }
    if (const json* v = field(m, "tool_calls")) {
      if (!v->is_array()) wrong_type(at + ".tool_calls", "an array", *v);
      cm.extra["tool_calls"] = nlohmann::ordered_json::parse(v->dump());
    }
    if (cm.role == "assistant" && !cm.content && !cm.extra.contains("tool_calls"))
      bad_request(at + ".content", "An assistant message needs 'content' or 'tool_calls'.");
    out.push_back(std::move(cm));
  }
  return out;
}

void parse_prompt(const json& obj, GenRequest& r) {
  const json* p = field(obj, "prompt");
  if (!p) bad_request("prompt", "'prompt' is a required property.");
  const json* one = p;
  if (p->is_array() && !p->empty() && (p->front().is_string() || p->front().is_array())) {
    if (p->size() != 1)
      bad_request("prompt", "Only one prompt per request is supported (got " +
                                std::to_string(p->size()) + ").");
    one = &p->front();
  }
  if (one->is_string()) {
    r.prompt_text = one->get<std::string>();
  } else if (one->is_array()) {
    if (one->empty()) bad_request("prompt", "'prompt' must not be empty.");
    r.prompt_is_ids = true;
    r.prompt_ids.reserve(one->size());
    for (const json& id : *one)
      r.prompt_ids.push_back(
          static_cast<int32_t>(as_int(id, "prompt", 0, std::numeric_limits<int32_t>::max())));
  } else {
    wrong_type("prompt", "a string, an array of token ids, or an array of one of them", *one);
  }
}

}  // namespace

std::vector<ChatMessage> parse_messages(const json& obj) {
  return messages_of(obj);
}

json parse_json_object(std::string_view body, int max_depth) {
  // Depth scan outside string literals; the parser below is iterative but walks over the result
  // (dump, destruction) may not be.
  int depth = 0;
  bool in_str = false, esc = false;
  for (char c : body) {
    if (in_str) {
      if (esc)
        esc = false;
      else if (c == '\\')
        esc = true;
      else if (c == '"')
        in_str = false;
    } else if (c == '"') {
      in_str = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        bad_request("", "The request body nests JSON deeper than " + std::to_string(max_depth) +
                            " levels.");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) bad_request("", "The request body is not valid JSON.", "invalid_json");
  if (!j.is_object()) bad_request("", "The request body must be a JSON object.", "invalid_json");
  return j;
}

GenRequest parse_request(Endpoint endpoint, std::string_view body, const ProtocolLimits& lim) {
  const json obj = parse_json_object(body, lim.max_json_depth);
  GenRequest r;
  r.endpoint = endpoint;
  parse_sampling(obj, lim, r);
  parse_response_format(obj, body, r);
  parse_tools(obj, body, r);
  if (r.json_output && (r.tool_choice == "required" || r.tool_choice == "function"))
    bad_request("response_format",
                "A JSON response_format cannot be combined with a required "
                "tool call.");
  if (r.ignore_eos && (r.tool_choice == "required" || r.tool_choice == "function"))
    bad_request("tool_choice", "'ignore_eos' cannot be combined with a required tool call.");
  if (r.json_output && r.ignore_eos)
    bad_request("response_format",
                "'ignore_eos' cannot be combined with a JSON response_format "
                "(the output ends when the value is complete).");
  if (r.json_output && r.min_tokens > 0)
    bad_request("min_tokens", "'min_tokens' cannot be combined with a JSON response_format.");
  if (endpoint == Endpoint::Chat) {
    r.messages = messages_of(obj);
    const bool want = get_bool(obj, "logprobs").value_or(false);
    const auto top = get_int(obj, "top_logprobs", 0, lim.max_top_logprobs);
    if (top && !want)
      bad_request("top_logprobs", "'logprobs' must be true when 'top_logprobs' is given.");
    if (want) r.top_logprobs = static_cast<int>(top.value_or(0));
    r.add_generation_prompt = get_bool(obj, "add_generation_prompt").value_or(true);
    if (const json* kw = field(obj, "chat_template_kwargs")) {
      if (!kw->is_object()) wrong_type("chat_template_kwargs", "an object", *kw);
      for (const char* k : {"messages", "add_generation_prompt", "tools", "documents"})
        if (kw->contains(k))
          bad_request("chat_template_kwargs",
                      std::string("'chat_template_kwargs' may not set '") + k + "'.");
      r.template_kwargs = nlohmann::ordered_json::parse(kw->dump());
    }
  } else {
    parse_prompt(obj, r);
    if (auto lp = get_int(obj, "logprobs", 0, lim.max_top_logprobs))
      r.top_logprobs = static_cast<int>(*lp);
  }
  return r;
}

}  // namespace moeserve::server
