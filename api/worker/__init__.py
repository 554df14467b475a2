"""A worker process: load the model, serve the Flask app with waitress.

Standalone (`python -m api`) it binds LISTEN_IP:LISTEN_PORT itself and serves until interrupted.

Under the supervisor (`python -m api --worker-id K --sentinel PATH --listen-fd N ...`, see
supervisor/) it follows the contract in api.protocol:
- it serves the listening socket the supervisor bound, and the same app on a private loopback
  port (the *control* port, its own waitress loop and threads) where the supervisor probes /health;
- it accepts on the public socket only while READY: not while its model loads, not while an
  inference runs (the next client goes to a spare), never again once it is DRAINING, and not
  before it passed the accept gate (api.accept_gate: never while the supervisor's 503 fallback
  answers on the same socket); and it takes
  one client at a time: after accepting a connection it accepts no other until that client's
  request is answered, so parallel clients spread over the workers and, with restart-per-request,
  none of them meets a used model;
- it serves clients in turn: a connection that sends no request within FRESH_CONNECTION_GRACE stops
  holding it, and while such silent ones stay open new connections hold nothing (a slowloris delays
  no one by more than one grace); a response closes its kept-alive connection when another client
  waits in the listen queue; and it closes idle connections without ever resetting a request that
  arrives at that instant (WorkerChannel.close_if_idle);
- before it runs a model it takes one of the WORKERS inference slots that all workers share
  (api.inference_slots), so spares that took a client wait instead of oversubscribing the cores,
  in one line across the workers (api.slot_queue: MAX_QUEUE long, QUEUE_TIMEOUT at most, first
  come first served, a client that leaves gives its place up at once);
- it reports itself in its sentinel file (state, requests served, token heartbeat);
- after RESTART_AFTER_REQUESTS inference requests (the supervisor passes the number, jitter
  included), or after a generation that ran over its time limit, or on a `drain` command, it
  answers what it has accepted, closes those connections, and exits with a named exit code;
- it dies with its supervisor: end of file on stdin, and PR_SET_PDEATHSIG on Linux.

This package, not the Flask app, decides when to accept connections; the app only reports
inference through the InferenceObserver protocol (api.generation), which WorkerLifecycle implements.
Each report names its HTTP request explicitly: the waitress task puts itself in the WSGI environ
(api.app.WORKER_REQUEST), the app keeps it in the request's record, and the generation service
passes it to `inference_started(request)`; no thread-local links the two.

By job: `lifecycle.py` the state, counts and exit decision (no waitress, no gpt4all);
`connections.py` the waitress integration; `supervised.py` a worker under the supervisor;
`process.py` process-level helpers; `cli.py` the command line and the fork-server entry.
"""
