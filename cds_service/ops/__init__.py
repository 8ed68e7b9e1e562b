"""What operators run and watch: the gunicorn server, the call pool, metrics, logs and live policy reload."""
