// build/grammar_check: the C++ side of tests/integration/test_grammar.py, which compares what
// postgresql/schema.sql notifies with what the module parses and what its positioner would send
// (docs/notification-grammar.md). Framed on stdin and stdout, so any byte can pass.
//
//   grammar_check parse   reads notifications, each "<bytes>\n<payload>"; writes per notification
//                         "fail\n", or "ok <events>\n" then per event
//                         "<kind> <position> <target> <sub offset> <sub bytes> <type offset>
//                          <type bytes> <payload offset> <payload bytes>\n" (kind e, r or p;
//                         offsets into the payload), from parse_notifications.
//   grammar_check wal     reads transactions, each "<rows>\n" then per row "<position> <target>
//                         <sub bytes> <type bytes> <payload bytes>\n<sub><type><payload>";
//                         writes per transaction "<notifications>\n" then each as
//                         "<bytes>\n<payload>", from wal_notifications.
#include "notification.hpp"
#include "positioner.hpp"

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

using namespace event_piper;

namespace {

bool read_bytes(size_t n, std::string &out) {
    out.assign(n, '\0');
    return n == 0 || std::fread(&out[0], 1, n, stdin) == n;
}

int parse_mode() {
    size_t size = 0;
    std::string text;
    std::vector<Notification> events;
    while (std::scanf("%zu", &size) == 1 && std::getchar() == '\n' && read_bytes(size, text)) {
        if (!parse_notifications(text, events)) {
            std::printf("fail\n");
            continue;
        }
        std::printf("ok %zu\n", events.size());
        auto offset = [&](std::string_view v) {
            return v.data() == nullptr ? 0L : static_cast<long>(v.data() - text.data());
        };
        for (const Notification &n : events) {
            char kind = n.kind == Notification::Kind::Event       ? 'e'
                        : n.kind == Notification::Kind::Reference ? 'r'
                                                                  : 'p';
            std::printf("%c %lld %lld %ld %zu %ld %zu %ld %zu\n", kind,
                        static_cast<long long>(n.position), static_cast<long long>(n.target),
                        offset(n.subscriber), n.subscriber.size(), offset(n.type), n.type.size(),
                        offset(n.payload), n.payload.size());
        }
    }
    return 0;
}

int wal_mode() {
    size_t rows = 0;
    while (std::scanf("%zu", &rows) == 1 && std::getchar() == '\n') {
        std::vector<WalRow> txn(rows);
        for (WalRow &r : txn) {
            long long position = 0, target = 0;
            size_t sub = 0, typ = 0, body = 0;
            if (std::scanf("%lld %lld %zu %zu %zu", &position, &target, &sub, &typ, &body) != 5 ||
                std::getchar() != '\n' || !read_bytes(sub, r.subscriber) ||
                !read_bytes(typ, r.type) || !read_bytes(body, r.payload)) {
                return 1;
            }
            r.position = position;
            r.target = target;
        }
        std::vector<const WalRow *> view;
        for (const WalRow &r : txn) {
            view.push_back(&r);
        }
        std::vector<std::string> out = wal_notifications(view);
        std::printf("%zu\n", out.size());
        for (const std::string &n : out) {
            std::printf("%zu\n", n.size());
            std::fwrite(n.data(), 1, n.size(), stdout);
        }
    }
    return 0;
}

} // namespace

int main(int argc, char **argv) {
    std::string mode = argc > 1 ? argv[1] : "";
    if (mode == "parse") {
        return parse_mode();
    }
    if (mode == "wal") {
        return wal_mode();
    }
    std::cerr << "usage: grammar_check parse|wal < framed input\n";
    return 2;
}
