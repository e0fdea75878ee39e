"""Running and watching the daemon: metrics, logs, systemd notification."""
