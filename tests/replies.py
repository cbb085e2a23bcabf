"""Test helpers that rewrite site replies on their way through a grid (fault and hostile-site tests)."""

from __future__ import annotations

from kumiki import contract as C, packing

HOSTILE = 2  # node id of site-1


def rewrite_replies(kind: str, change, node: int = HOSTILE, rounds=(1,)):
    """Rewrite one node's replies of one message kind ('train', 'evaluate', 'query.profile'). 'evaluate' covers
    both ways an evaluation travels: an evaluate reply, and a train reply's ``evaluation`` record."""
    def hook(grid):
        send = grid.send_and_receive

        def wrapped(messages, *, timeout=None):
            messages = list(messages)
            replies = send(messages, timeout=timeout)
            for msg, rep in zip(messages, replies):
                md = msg.metadata
                rnd = int(msg.content[C.CONFIG][C.ROUND])
                if md.message_type == kind and md.dst_node_id == node and (kind == "query.profile" or rnd in rounds):
                    change(rep)
                fused = msg.content[C.CONFIG].get(C.EVALUATE_ROUND)
                if kind == "evaluate" and md.message_type == "train" and md.dst_node_id == node and fused in rounds \
                        and not rep.has_error():
                    as_evaluate_reply(rep, change)
            return replies

        grid.send_and_receive = wrapped
    return hook


def as_evaluate_reply(rep, change) -> None:
    """Apply an evaluate-reply ``change`` to the evaluation a train reply carries."""
    records = rep.content.metric_records
    train = records.pop(C.METRICS)
    if C.EVALUATION in records:
        rep.content[C.METRICS] = records.pop(C.EVALUATION)
    change(rep)
    if C.METRICS in records:
        rep.content[C.EVALUATION] = records.pop(C.METRICS)
    rep.content[C.METRICS] = train


def on_arrays(change):
    """A reply change that rewrites the reply's arrays (as numpy) with ``change``."""
    def apply(rep):
        packing.put(rep.content, change(arrays_of(rep.content)))
    return apply


def arrays_of(content) -> dict:
    """A message's or reply's tensors (one packed array, ``kumiki.packing``) as writable numpy copies."""
    return {k: v.copy() for k, v in packing.take(content).items()}


def names_of(content) -> set[str]:
    """The tensor names a message carries (its packed index)."""
    return set(packing.take(content)) if C.ARRAYS in content.array_records else set()
