"""N sessions that LISTEN on new_events, until killed.

    idle_listeners.py <conninfo> <n>          never read: stand-ins for the listening backends of
                                              other nginx instances (bench/run.sh (g))
    idle_listeners.py <conninfo> <n> --read   read every notification as it comes, like a
                                              listener that keeps up (bench/writers.sh): no CPU
                                              while nothing is notified
"""
import select
import sys
import time

import psycopg2

conns = []
for _ in range(int(sys.argv[2])):
    c = psycopg2.connect(sys.argv[1], application_name="bench_idle_listener")
    c.autocommit = True
    c.cursor().execute("LISTEN new_events")
    conns.append(c)
if "--read" not in sys.argv[3:]:
    time.sleep(3600)
    sys.exit(0)
while True:
    ready, _, _ = select.select(conns, [], [])
    for c in ready:
        c.poll()
        c.notifies.clear()
