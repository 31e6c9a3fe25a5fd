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


def _swarm(*spans, num_blocks=8, throughput=10.0, movable=True):
    """Records per block for peers "p0", "p1", ... serving `spans` (ONLINE)."""
    records = [[] for _ in range(num_blocks)]
    for i, (start, end) in enumerate(spans):
        record = ServerRecord(peer_id=f"p{i}", state=ServerState.ONLINE, start=start, end=end, throughput=throughput,
                              free_cache_tokens=0, max_cache_tokens=0, version="0", torch_dtype="float32",
                              movable=movable)
        for block in range(start, end):
            records[block].append(record)
    return records


def test_a_peer_moves_to_close_a_gap_without_opening_another():
    from swarmlm.peer.rebalancing import plan_move

    move = plan_move(_swarm((0, 4), (0, 4)), margin=0.2)
    assert (move.peer_id, move.start, move.end, move.covered_blocks) == ("p0", 4, 8, 8)
    move = plan_move(_swarm((0, 4), (2, 6)), margin=0.2)  # p1 slides right: blocks 2:4 stay with p0
    assert (move.peer_id, move.start, move.end) == ("p1", 4, 8)
    assert plan_move(_swarm((0, 4), (4, 7)), margin=0.2) is None  # closing block 7 would uncover block 4


def test_balanced_swarms_stay_put_and_pinned_peers_never_move():
    from swarmlm.peer.rebalancing import plan_move

    assert plan_move(_swarm((0, 4), (4, 8), (0, 4)), margin=0.2) is None  # a move cannot raise the bottleneck
    assert plan_move(_swarm((0, 4), (0, 4), movable=False), margin=0.2) is None


def test_hysteresis_needs_a_clear_gain():
    from swarmlm.peer.rebalancing import plan_move

    # blocks 4:8 have 2 peers, 0:4 have 3 -> moving one 0:4 peer makes 0:4 have 2 and 4:8 have 3: bottleneck same
    assert plan_move(_swarm((0, 4), (0, 4), (0, 4), (4, 8), (4, 8)), margin=0.2) is None
    # blocks 4:8 have 1 peer, 0:4 have 3: a move doubles the bottleneck (10 -> 20 tokens/s)
    move = plan_move(_swarm((0, 4), (0, 4), (0, 4), (4, 8)), margin=0.2)
    assert (move.start, move.end, move.bottleneck) == (4, 8, 20.0)
    assert plan_move(_swarm((0, 4), (0, 4), (0, 4), (4, 8)), margin=1.5) is None


def test_a_block_only_a_joining_peer_announces_is_not_covered():
    """Clients route only to ONLINE peers: no move may leave a block to a peer that is still loading,
    but the capacity it brings still steers where peers go."""
    from swarmlm.peer.rebalancing import plan_move

    def rec(peer, state, start, end, movable=True):
        return ServerRecord(peer_id=peer, state=state, start=start, end=end, throughput=10.0, free_cache_tokens=0,
                            max_cache_tokens=0, version="0", torch_dtype="float32", movable=movable)

    def swarm(*records):
        return [[r for r in records if r.start <= block < r.end] for block in range(8)]

    online = ServerState.ONLINE
    # p0 alone serves 4:8 while p1 loads 4:8: moving p0 to the gap 2:4 would leave 4:8 to a loading peer
    assert plan_move(swarm(rec("p0", online, 4, 8), rec("p1", ServerState.JOINING, 4, 8),
                           rec("p2", online, 0, 2, movable=False)), margin=0.2) is None
    # ...and a peer loading 4:8 keeps a movable peer from rushing there too: p0 stays, nobody else moves
    assert plan_move(swarm(rec("p0", online, 0, 4), rec("p1", online, 0, 4, movable=False),
                           rec("p2", ServerState.JOINING, 4, 8)), margin=0.2) is None
