"""What a merge makes from a spec alone, kept for the next merge of the same spec.

Three things a merge makes depend on the spec and its points, not on the weights:
- the paired graph of the joint pass (``passes.pair``; ``stats.run_pair``): building it copies the
  traced graph twice over and generates its code (about 6 ms on the paper's 20-layer MLP);
- with output "class", the plan of what is done to each reset (``repair.class_resets``: scale-only,
  left out), made from a pass of the merged graph over the example and a trial fold on a copy of
  its graph (about 5 ms there), and with it the second calibration a left-out reset needs;
- with output "class", the merged graph with its resets as planned (a copy of the traced graph,
  the resets inserted, its code generated: 9 ms there), with the steps of its fold
  (``passes.fold_affine.FoldStep``): the next merge gives it its weights and goals
  (``repair._rebind``) and plays the fold again on them (``passes.fold_affine.refold``), the graph
  left as it is: not copied, folded and put back (2-4 ms there, and a graph left to the collector
  at every merge). It is kept only when the merge returned the class and the fold added no
  parameter to its modules.
A barrier curve or a study merges one architecture many times; the next merge takes them:

- keyed by the spec's traced graph (a weak reference: what is kept lives as long as the spec,
  which discovery keeps as long as its model, ``discovery.reuse``) and by everything else they
  depend on (the tap nodes; the reset points, the output form, the REPAIR mode, the example's
  shapes);
- holding no model and no merge's weights while they wait: the paired module is unbound
  (``passes.pair.unbind_pair``), the merged graph given back the traced graph's own tensors
  (``repair._unbind``; the spec holds them anyway), and a plan is a table of strings;
- taken by one merge at a time: ``take`` removes an entry and ``give`` puts it back, so that two
  merges of one spec in two threads each have their own (the second makes its own).

A merge that takes them merges exactly as one that makes them (tests/test_kept.py).
``clear()`` forgets everything kept; ``info()`` counts the hits and misses since the process
started.
"""

from __future__ import annotations

import threading
import weakref

import torch.fx

_kept: "weakref.WeakKeyDictionary[torch.fx.GraphModule, dict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def take(traced: torch.fx.GraphModule, key: tuple):
    """What is kept for ``traced`` under ``key`` (removed until given back), or None."""
    with _lock:
        found = _kept.get(traced, {}).pop(key, None)
        _stats["hits" if found is not None else "misses"] += 1
    return found


def give(traced: torch.fx.GraphModule, key: tuple, made) -> None:
    """Keep ``made`` (holding no model and no merge's weights) for the next merge of ``traced``'s spec."""
    with _lock:
        _kept.setdefault(traced, {})[key] = made


def clear() -> None:
    """Forget everything kept."""
    with _lock:
        _kept.clear()


def info() -> dict:
    """{"hits", "misses", "entries"}: takes that found something and that did not, since the
    process started, and what is kept now."""
    with _lock:
        return {**_stats, "entries": sum(len(v) for v in _kept.values())}
