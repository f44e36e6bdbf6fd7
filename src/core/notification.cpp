// Notification parsing: a one-line ASCII header with byte lengths, then raw bytes, so that
// subscriber, type and payload need no escaping and no JSON parse on the hot path. The grammar:
// docs/notification-grammar.md; its constants: grammar.hpp.
#include "notification.hpp"

#include "grammar.hpp"

#include <charconv>

namespace event_piper {

namespace {

using grammar::field_separator;
using grammar::header_end;

// Reads a decimal number followed by `sep`; advances `p`.
template <typename T> bool read_number(const char *&p, const char *end, char sep, T &value) {
    auto res = std::from_chars(p, end, value);
    if (res.ec != std::errc() || res.ptr == p || res.ptr >= end || *res.ptr != sep) {
        return false;
    }
    p = res.ptr + 1;
    return true;
}

// The last number of a header: followed by '\n', or by ' ' and a patch's target position (a
// positive number below `position`, then '\n').
template <typename T>
bool read_last_number(const char *&p, const char *end, T &value, int64_t position,
                      int64_t &target) {
    auto res = std::from_chars(p, end, value);
    if (res.ec != std::errc() || res.ptr == p || res.ptr >= end) {
        return false;
    }
    p = res.ptr + 1;
    if (*res.ptr == header_end) {
        return true;
    }
    return *res.ptr == field_separator && read_number(p, end, header_end, target) && target > 0 &&
           target < position;
}

} // namespace

bool parse_notification(std::string_view text, Notification &out) {
    if (text.size() < 3 || text[1] != field_separator) {
        return false;
    }
    const char *p = text.data() + 2;
    const char *end = text.data() + text.size();
    out = Notification{};
    switch (text[0]) {
    case grammar::form_position: {
        auto res = std::from_chars(p, end, out.position);
        if (res.ec != std::errc() || res.ptr != end || out.position <= 0) {
            return false;
        }
        out.kind = Notification::Kind::Position;
        return true;
    }
    case grammar::form_reference: {
        size_t sublen = 0;
        if (!read_number(p, end, field_separator, out.position) ||
            !read_number(p, end, header_end, sublen) || out.position <= 0 ||
            static_cast<size_t>(end - p) != sublen) {
            return false;
        }
        out.kind = Notification::Kind::Reference;
        out.subscriber = std::string_view(p, sublen);
        return true;
    }
    case grammar::form_event: {
        size_t sublen = 0;
        size_t typelen = 0;
        if (!read_number(p, end, field_separator, out.position) ||
            !read_number(p, end, field_separator, sublen) || out.position <= 0 ||
            !read_last_number(p, end, typelen, out.position, out.target)) {
            return false;
        }
        size_t rest = static_cast<size_t>(end - p);
        if (sublen > rest || typelen > rest - sublen || rest - sublen - typelen == 0) {
            return false;
        }
        out.kind = Notification::Kind::Event;
        out.subscriber = std::string_view(p, sublen);
        out.type = std::string_view(p + sublen, typelen);
        out.payload = std::string_view(p + sublen + typelen, rest - sublen - typelen);
        return true;
    }
    default:
        return false;
    }
}

bool parse_notifications(std::string_view text, std::vector<Notification> &out) {
    out.clear();
    if (text.size() < 2 || text[0] != grammar::form_batch || text[1] != header_end) {
        Notification n;
        if (!parse_notification(text, n)) {
            return false;
        }
        out.push_back(n);
        return true;
    }
    const char *p = text.data() + 2;
    const char *end = text.data() + text.size();
    while (p < end) {
        Notification n;
        size_t sublen = 0;
        size_t typelen = 0;
        size_t paylen = 0;
        if (!read_number(p, end, field_separator, n.position) ||
            !read_number(p, end, field_separator, sublen) ||
            !read_number(p, end, field_separator, typelen) || n.position <= 0 ||
            !read_last_number(p, end, paylen, n.position, n.target) ||
            (!out.empty() && n.position <= out.back().position) || paylen == 0) {
            out.clear();
            return false;
        }
        size_t rest = static_cast<size_t>(end - p);
        if (sublen > rest || typelen > rest - sublen || paylen > rest - sublen - typelen) {
            out.clear();
            return false;
        }
        n.kind = Notification::Kind::Event;
        n.subscriber = std::string_view(p, sublen);
        n.type = std::string_view(p + sublen, typelen);
        n.payload = std::string_view(p + sublen + typelen, paylen);
        p += sublen + typelen + paylen;
        out.push_back(n);
    }
    if (out.empty()) {
        return false;
    }
    return true;
}

} // namespace event_piper
