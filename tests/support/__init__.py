"""Tools the tests share: the running gateway and its config, raw HTTP on real sockets,
waiting for a condition, a stand-in for systemd's notify socket. Test files import from here,
never from each other."""
