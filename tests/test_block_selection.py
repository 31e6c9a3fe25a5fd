from swarmlm.dht.records import ServerRecord, ServerState
from swarmlm.peer.block_selection import block_throughputs, choose_span


def test_uncovered_blocks_win():
    assert choose_span([0, 0, 0, 0, 0, 0], 2) == (0, 2)
    assert choose_span([5, 5, 5, 0, 0, 5], 2) == (3, 5)
    assert choose_span([5, 5, 5, 5, 1, 0], 3) == (3, 6)


def test_weakest_window_by_sorted_throughputs():
    assert choose_span([3, 3, 1, 2, 2, 9], 2) == (2, 4)


def test_offline_peers_do_not_count():
    def rec(peer, state, start, end):
        return ServerRecord(peer_id=peer, state=state, start=start, end=end, throughput=10.0, free_cache_tokens=0,
                            max_cache_tokens=0, version="0", torch_dtype="float32")

    records = [[rec("a", ServerState.ONLINE, 0, 2)], [rec("a", ServerState.ONLINE, 0, 2)],
               [rec("b", ServerState.OFFLINE, 2, 4)], [rec("b", ServerState.OFFLINE, 2, 4)]]
    assert block_throughputs(records) == [10.0, 10.0, 0, 0]
    assert choose_span(block_throughputs(records), 2) == (2, 4)
