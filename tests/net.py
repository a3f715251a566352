"""Networking helpers shared by the multi-process tests."""
import socket


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on at the moment of the call.

    The socket is closed before the port is returned, so another process may take it before the
    caller binds it; good enough for a test's rendezvous port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
