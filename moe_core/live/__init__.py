"""A training process seen from outside: its lease on the run, its control channel, its heartbeat.

    runs/NAME/process.json     who trains this run (pid, host) and how that process ended
    runs/NAME/control/         mode 0700: only the run's owner gets in
        lock                   held (flock) by the live trainer for its whole life; free once it is gone
        socket                 the trainer's Unix socket: commands in, live events out (protocol.py)

`lease` claims a run for one trainer, `server` is the trainer's end of the socket, `client` a
viewer's, `usage` samples what the process costs, and `follow` turns a run folder plus its socket
into the event stream a viewer draws, for a live run or a finished one alike.
"""
