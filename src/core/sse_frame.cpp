// SSE framing and compact JSON re-serialisation.
// We do not round-trip payloads through a JSON library: jsonb numbers are arbitrary precision
// and a double-based parser (cJSON) would rewrite 12345678901234567890 as 1.2345678901234567e+19.
#include "sse_frame.hpp"

#include "text.hpp"

namespace event_piper {

namespace {

// Appends `data: ` lines for text that may contain CR, LF or CRLF line breaks.
void append_data_lines(std::string &out, std::string_view text) {
    size_t start = 0;
    for (;;) {
        size_t brk = text.find_first_of("\r\n", start);
        out.append("data: ");
        if (brk == std::string_view::npos) {
            out.append(text.substr(start));
            out.push_back('\n');
            return;
        }
        out.append(text.substr(start, brk - start));
        out.push_back('\n');
        start = brk + 1;
        if (text[brk] == '\r' && start < text.size() && text[start] == '\n') {
            ++start;
        }
    }
}

} // namespace

void append_compact_json(std::string &out, std::string_view json) {
    const char *p = json.data();
    const char *end = p + json.size();
    out.reserve(out.size() + json.size());
    while (p < end) {
        // Copy a run of non-whitespace, non-quote bytes at once.
        const char *run = p;
        while (p < end && *p != '"' && *p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') {
            ++p;
        }
        out.append(run, static_cast<size_t>(p - run));
        if (p >= end) {
            break;
        }
        if (*p != '"') {
            ++p; // insignificant whitespace
            continue;
        }
        // A string: copy up to the closing quote, honouring backslash escapes.
        run = p++;
        while (p < end && *p != '"') {
            p += (*p == '\\' && p + 1 < end) ? 2 : 1;
        }
        if (p < end) {
            ++p;
        }
        out.append(run, static_cast<size_t>(p - run));
    }
}

namespace {

// The `data:` field from `payload_start` (just after "data: ") on: one line in the common case,
// else split at CR/LF into several `data:` lines; then the blank line that ends the message.
void finish_data(std::string &out, size_t payload_start) {
    if (out.find_first_of("\r\n", payload_start) == std::string::npos) {
        out.append("\n\n"); // the common case: one data line
        return;
    }
    std::string compact = out.substr(payload_start);
    out.resize(payload_start - 6);
    append_data_lines(out, compact);
    out.push_back('\n');
}

} // namespace

void append_event_frame(std::string &out, int64_t id, std::string_view type,
                        std::string_view json_payload) {
    out.append("id: ");
    append_decimal(out, id);
    out.append("\nevent: ");
    for (char c : type) {
        if (c != '\r' && c != '\n') {
            out.push_back(c);
        }
    }
    out.push_back('\n');
    out.append("data: ");
    size_t payload_start = out.size();
    append_compact_json(out, json_payload);
    finish_data(out, payload_start);
}

void append_json_string(std::string &out, std::string_view text) {
    static const char hex[] = "0123456789abcdef";
    out.push_back('"');
    for (char c : text) {
        auto u = static_cast<unsigned char>(c);
        if (c == '"' || c == '\\') {
            out.push_back('\\');
            out.push_back(c);
        } else if (u < 0x20) {
            out.append("\\u00");
            out.push_back(hex[u >> 4]);
            out.push_back(hex[u & 15]);
        } else {
            out.push_back(c);
        }
    }
    out.push_back('"');
}

void append_target_frame(std::string &out, int64_t id, int64_t target, TargetMember member,
                         std::string_view type, std::string_view json_payload) {
    out.append("id: ");
    append_decimal(out, id);
    out.append("\nevent: patch\ndata: ");
    size_t payload_start = out.size();
    out.append("{\"target\":");
    append_decimal(out, target);
    out.append(",\"type\":");
    append_json_string(out, type);
    out.append(member == TargetMember::Patch ? ",\"patch\":" : ",\"state\":");
    append_compact_json(out, json_payload);
    out.push_back('}');
    finish_data(out, payload_start);
}

std::string_view heartbeat_frame() {
    return "event: heartbeat\ndata: \n\n";
}

void append_history_gone_frame(std::string &out, int64_t resumed_after, int64_t removed_upto) {
    out.append("event: history-gone\ndata: {\"last_event_id\":");
    append_decimal(out, resumed_after);
    out.append(",\"removed_upto\":");
    append_decimal(out, removed_upto);
    out.append("}\n\n");
}

void append_retry_frame(std::string &out, uint64_t milliseconds) {
    out.append("retry: ");
    append_decimal(out, milliseconds);
    out.append("\n\n");
}

} // namespace event_piper
