"""Settings for running the vendor guide's gunicorn line with the same behaviour as the daemon:

    gunicorn -c python:tq_mw_thehive.gunicorn_conf -b 0.0.0.0:5000 'tq_mw_thehive.tq_driver:run(c="/etc/tq_labs/")'

Without it gunicorn still serves the app, but its own refusals are HTML, a connection is
kept after a large refused body, SIGTERM does not wait for the event in progress, and a few slow
clients can hold every thread (post_worker_init makes the gthread worker an intake.IntakeWorker).
"""
from tq_mw_thehive import intake, server

worker_class = "gthread"
threads = 4
worker_connections = intake.WORKER_CONNECTIONS
accesslog = None
control_socket_disable = True
post_worker_init = server._post_worker_init
pre_request = server._pre_request
worker_exit = server._worker_exit
child_exit = server._child_exit
