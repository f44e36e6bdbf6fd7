// An example client for ngx_event_piper in plain Java 17: the JDK's java.net.http.HttpClient and
// nothing else. It follows the Server-Sent Events specification
// (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end in CRLF, LF or CR;
// `:` starts a comment; `field: value` with one optional space; `data` lines join with "\n";
// an event is dispatched at a blank line, and one cut short by the end of the stream is dropped;
// `id` sets the last event id (unless it holds NUL), which an event without data also does;
// `retry` (digits only) sets the reconnection delay. When the stream ends or the connection
// fails, it waits that delay and reconnects with `Last-Event-ID`, so nothing is missed and
// nothing arrives twice. A 204, a status other than 200 or a body that is not
// text/event-stream ends it for good, as the specification says. A connection that stays
// silent longer than the idle timeout (the module sends a heartbeat every 10 s by default) is
// presumed dead (a network black hole never ends it) and replaced the same way.
//
//   javac -d build/java examples/java/EventPiperClient.java
//   java -cp build/java EventPiperClient http://localhost:4000/events --consumer toto
// or, without compiling first: java examples/java/EventPiperClient.java URL --consumer toto
//
// Options: --consumer ID (sends X-Consumer-Id), --header 'Name: value' (repeatable),
// --last-event-id ID (resume point of the first request), --count N (exit after N events,
// heartbeats and history-gone not counted), --retry MS (delay before the server sends one; default 3000),
// --idle-timeout MS (default 30000, three heartbeats; 0: wait forever).
// It prints one JSON object a line: {"kind":"open",...}, {"kind":"event","id":...,"type":...,
// "data":...}, {"kind":"retry","ms":...}, {"kind":"error",...}, {"kind":"done"}.
// Use it as a library through EventPiperClient.Listener and run().

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.ScheduledFuture;
import java.util.concurrent.TimeUnit;

public final class EventPiperClient {

    /** What the client reports. Called on the thread that runs run(). */
    public interface Listener {
        /** A connection was opened (200, text/event-stream); n counts them from 1. */
        default void onOpen(int n, String lastEventIdSent) {}

        /** One event: its id (the last event id once it is dispatched), type and data. */
        void onEvent(String id, String type, String data);

        /** The server set the reconnection delay. */
        default void onRetry(long millis) {}

        /** The connection ended or failed; `reconnecting` says whether it will try again. */
        default void onError(String message, boolean reconnecting) {}

        /** Whether to go on (false ends run() after the current event). */
        default boolean wantsMore() { return true; }
    }

    private final HttpClient http;
    private final URI uri;
    private final List<String[]> headers;
    private final Listener listener;
    private String lastEventId;
    private long retryMillis;
    private final long idleMillis;
    private int connections;
    private volatile boolean stopped;
    private volatile long lastBytesAt; // System.nanoTime() of the last bytes received
    private volatile boolean idleClosed;
    private final ScheduledExecutorService watchdog = Executors.newSingleThreadScheduledExecutor(r -> {
        Thread t = new Thread(r, "event-piper-idle-watchdog");
        t.setDaemon(true);
        return t;
    });

    public EventPiperClient(URI uri, List<String[]> headers, String lastEventId, long retryMillis,
                            long idleMillis, Listener listener) {
        // HTTP/1.1: over plain http the JDK's HTTP/2 default would ask for an h2c upgrade.
        this.http = HttpClient.newBuilder()
                        .version(HttpClient.Version.HTTP_1_1)
                        .connectTimeout(Duration.ofSeconds(10))
                        .build();
        this.uri = uri;
        this.headers = headers;
        this.lastEventId = lastEventId == null ? "" : lastEventId;
        this.retryMillis = retryMillis;
        this.idleMillis = idleMillis;
        this.listener = listener;
    }

    /** Ends run() at the next event or reconnection. */
    public void stop() { stopped = true; }

    /** Streams until the listener has enough, stop() is called, or the server refuses for good. */
    public void run() throws InterruptedException {
        try {
            loop();
        } finally {
            watchdog.shutdownNow();
        }
    }

    private void loop() throws InterruptedException {
        while (!stopped && listener.wantsMore()) {
            String failure;
            try {
                failure = connectOnce();
            } catch (IOException e) {
                failure = "connection failed: " + e;
            }
            if (failure == null) {
                return; // refused for good, already reported, or the listener is done
            }
            if (stopped || !listener.wantsMore()) {
                return;
            }
            listener.onError(failure, true);
            Thread.sleep(retryMillis);
        }
    }

    // One connection. Returns why it ended when reconnecting makes sense, or null when not.
    private String connectOnce() throws IOException, InterruptedException {
        HttpRequest.Builder request = HttpRequest.newBuilder(uri)
                                          .GET()
                                          .header("Accept", "text/event-stream")
                                          .header("Cache-Control", "no-cache");
        for (String[] h : headers) {
            request.header(h[0], h[1]);
        }
        String sent = lastEventId.isEmpty() ? null : lastEventId;
        if (sent != null) {
            request.header("Last-Event-ID", sent);
        }
        HttpResponse<InputStream> response =
            http.send(request.build(), HttpResponse.BodyHandlers.ofInputStream());
        InputStream body = response.body();
        try {
            int status = response.statusCode();
            String type = response.headers().firstValue("Content-Type").orElse("");
            if (status != 200 || !type.toLowerCase().startsWith("text/event-stream")) {
                String why = status == 204 ? "204 No Content: the server asks not to reconnect"
                                           : "HTTP " + status + " (" + type + ")";
                listener.onError(why, false);
                stopped = true;
                return null;
            }
            listener.onOpen(++connections, sent);
            // Closing the body from the watchdog's thread ends a read blocked on a dead
            // connection with an IOException.
            lastBytesAt = System.nanoTime();
            idleClosed = false;
            ScheduledFuture<?> check = null;
            if (idleMillis > 0) {
                long period = Math.max(idleMillis / 4, 50);
                check = watchdog.scheduleAtFixedRate(() -> {
                    if (System.nanoTime() - lastBytesAt > TimeUnit.MILLISECONDS.toNanos(idleMillis)) {
                        idleClosed = true;
                        try {
                            body.close();
                        } catch (IOException ignored) {
                            // the reader sees the stream end either way
                        }
                    }
                }, period, period, TimeUnit.MILLISECONDS);
            }
            try {
                return read(body);
            } catch (IOException e) {
                if (idleClosed) {
                    return "nothing received for " + idleMillis + " ms: the connection is presumed dead";
                }
                throw e;
            } finally {
                if (check != null) {
                    check.cancel(false);
                }
            }
        } finally {
            body.close();
        }
    }

    // The parser's state for one connection (the last event id survives connections).
    private final StringBuilder data = new StringBuilder();
    private String eventType = "";
    private String idBuffer = "";

    private String read(InputStream body) throws IOException {
        data.setLength(0);
        eventType = "";
        idBuffer = lastEventId;
        ByteArrayOutputStream line = new ByteArrayOutputStream();
        boolean afterCr = false;
        boolean first = true;
        byte[] buf = new byte[8192];
        int n;
        while ((n = body.read(buf)) > 0) {
            lastBytesAt = System.nanoTime();
            for (int i = 0; i < n; i++) {
                byte b = buf[i];
                if (afterCr && b == '\n') { // the LF of a CRLF
                    afterCr = false;
                    continue;
                }
                afterCr = b == '\r';
                if (b == '\r' || b == '\n') {
                    String text = line.toString(StandardCharsets.UTF_8);
                    line.reset();
                    if (first && text.startsWith("\uFEFF")) {
                        text = text.substring(1); // a byte order mark may start the stream
                    }
                    first = false;
                    if (!processLine(text)) {
                        return null;
                    }
                } else {
                    line.write(b);
                }
            }
        }
        // Whatever was not ended by a blank line is dropped with the connection.
        return idleClosed ? "nothing received for " + idleMillis + " ms: the connection is presumed dead"
                          : "the stream ended";
    }

    // Returns false once the listener has had enough.
    private boolean processLine(String text) {
        if (text.isEmpty()) {
            return dispatch();
        }
        if (text.charAt(0) == ':') {
            return true; // a comment
        }
        String field = text;
        String value = "";
        int colon = text.indexOf(':');
        if (colon >= 0) {
            field = text.substring(0, colon);
            value = text.substring(colon + 1);
            if (value.startsWith(" ")) {
                value = value.substring(1);
            }
        }
        switch (field) {
        case "event":
            eventType = value;
            break;
        case "data":
            data.append(value).append('\n');
            break;
        case "id":
            if (value.indexOf('\0') < 0) {
                idBuffer = value;
            }
            break;
        case "retry":
            if (!value.isEmpty() && value.chars().allMatch(c -> c >= '0' && c <= '9')) {
                try {
                    retryMillis = Long.parseLong(value);
                    listener.onRetry(retryMillis);
                } catch (NumberFormatException tooLong) {
                    // ignored, like any field the client cannot use
                }
            }
            break;
        default:
            break; // unknown fields are ignored
        }
        return true;
    }

    private boolean dispatch() {
        lastEventId = idBuffer;
        if (data.length() == 0) {
            eventType = "";
            return true;
        }
        data.setLength(data.length() - 1); // the last data line's "\n"
        String type = eventType.isEmpty() ? "message" : eventType;
        String payload = data.toString();
        data.setLength(0);
        eventType = "";
        listener.onEvent(lastEventId, type, payload);
        return !stopped && listener.wantsMore();
    }

    // --- command line ------------------------------------------------------------------------

    static String json(String s) {
        if (s == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder("\"");
        for (int i = 0; i < s.length(); i++) {
            char c = s.charAt(i);
            switch (c) {
            case '"': out.append("\\\""); break;
            case '\\': out.append("\\\\"); break;
            case '\n': out.append("\\n"); break;
            case '\r': out.append("\\r"); break;
            case '\t': out.append("\\t"); break;
            default:
                if (c < 0x20) {
                    out.append(String.format("\\u%04x", (int) c));
                } else {
                    out.append(c);
                }
            }
        }
        return out.append('"').toString();
    }

    static void print(String line) {
        System.out.println(line);
        System.out.flush();
    }

    public static void main(String[] args) throws Exception {
        if (args.length < 1 || args[0].startsWith("--")) {
            System.err.println("usage: EventPiperClient URL [--consumer ID] [--header 'Name: value']..."
                               + " [--last-event-id ID] [--count N] [--retry MS] [--idle-timeout MS]");
            System.exit(2);
        }
        URI uri = URI.create(args[0]);
        List<String[]> headers = new ArrayList<>();
        String lastEventId = null;
        long count = 0;
        long retry = 3000;
        long idle = 30000;
        for (int i = 1; i < args.length; i++) {
            String opt = args[i];
            if (i + 1 >= args.length) {
                throw new IllegalArgumentException(opt + " needs a value");
            }
            String value = args[++i];
            switch (opt) {
            case "--consumer":
                headers.add(new String[] {"X-Consumer-Id", value});
                break;
            case "--header": {
                int colon = value.indexOf(':');
                if (colon <= 0) {
                    throw new IllegalArgumentException("--header wants 'Name: value'");
                }
                headers.add(new String[] {value.substring(0, colon).trim(),
                                          value.substring(colon + 1).trim()});
                break;
            }
            case "--last-event-id":
                lastEventId = value;
                break;
            case "--count":
                count = Long.parseLong(value);
                break;
            case "--retry":
                retry = Long.parseLong(value);
                break;
            case "--idle-timeout":
                idle = Long.parseLong(value);
                break;
            default:
                throw new IllegalArgumentException("unknown option " + opt);
            }
        }
        final long wanted = count;
        Listener printer = new Listener() {
            long received;

            @Override
            public void onOpen(int n, String sent) {
                print("{\"kind\":\"open\",\"n\":" + n + ",\"lastEventId\":" + json(sent) + "}");
            }

            @Override
            public void onEvent(String id, String type, String data) {
                // The module's keep-alive, and its notice that retention removed history: not
                // events of the consumer.
                if (!type.equals("heartbeat") && !type.equals("history-gone")) {
                    received++;
                }
                print("{\"kind\":\"event\",\"id\":" + json(id) + ",\"type\":" + json(type)
                      + ",\"data\":" + json(data) + "}");
            }

            @Override
            public void onRetry(long millis) {
                print("{\"kind\":\"retry\",\"ms\":" + millis + "}");
            }

            @Override
            public void onError(String message, boolean reconnecting) {
                print("{\"kind\":\"error\",\"message\":" + json(message) + ",\"reconnecting\":"
                      + reconnecting + "}");
            }

            @Override
            public boolean wantsMore() {
                return wanted == 0 || received < wanted;
            }
        };
        new EventPiperClient(uri, headers, lastEventId, retry, idle, printer).run();
        print("{\"kind\":\"done\"}");
    }
}
