"""bench/run.sh (g): N sessions that LISTEN on new_events and never read, standing in for the
listening backends of other nginx instances. Runs until killed."""
import sys
import time

import psycopg2

conns = []
for _ in range(int(sys.argv[2])):
    c = psycopg2.connect(sys.argv[1], application_name="bench_idle_listener")
    c.autocommit = True
    c.cursor().execute("LISTEN new_events")
    conns.append(c)
time.sleep(3600)
