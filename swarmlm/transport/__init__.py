"""The wire: every byte between nodes goes through this package.

    p2p.py      the one adapter to hivemind's P2P (public API): wire names, handler registration, calls
    framing.py  one protobuf message per frame, size-limited reads
    direct.py   plain TCP connections beside the p2p daemons (hello handshake, connection limits)
    channel.py  Channel (one framed stream, direct or p2p) and Dialer (opens channels, makes protobuf calls)
    server.py   Server (what a node serves, on p2p and direct TCP, behind one admission hook)
    limits.py   open channels per source and in total; the process's open-files limit
    membership.py  private swarms: the membership proof that starts every channel and call

Clients and peers ask a Dialer for channels and calls, and hand their methods to a Server; they never
open sockets or p2p streams themselves. What the messages mean is swarmlm.experts.protocol's business.
"""

from swarmlm.transport.channel import Channel, ChannelClosedError, Dialer
from swarmlm.transport.server import RefusedError, Server

__all__ = ["Channel", "ChannelClosedError", "Dialer", "RefusedError", "Server"]
