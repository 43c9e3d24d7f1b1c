"""The B/W split of a stage's backward: the input gradient now (B), the weight gradient later (W).

`PipelineExecutor` (``executor.py``) calls `_split_input_backward` for a B op under
``weight_grad="split"`` (its default) and runs the returned `_DeferredWeightGrad` at the W op that
names the same (micro-batch, stage).

B/W split: how, and what it costs
---------------------------------
``weight_grad="split"`` splits the backward at the graph level, without knowledge of the layers
(the method of torch.distributed.pipelining's ``stage_backward_input/_weight``, with the weight
pass done per cut edge so nothing is computed twice):

* In B the executor walks the stage's autograd graph, finds the *input closure* (nodes whose
  backward leads to the stage input) and the *cut*: edges from a node of the input closure to
  a node that only leads to parameters (e.g. ``AddmmBackward -> TBackward -> AccumulateGrad``).
  It hooks the nodes on the input side of the cut (the "intermediates": matmuls, norms, ...),
  runs ``torch.autograd.grad(output, stage_input, retain_graph=True)``, and stores the gradient
  each intermediate received. The engine prunes the weight branches, so B does no weight work.
* W runs each intermediate's backward once more for its parameter-side edges only (one
  ``autograd.grad`` per intermediate, so a gradient never flows from one intermediate into
  another and nothing is counted twice, tied weights included), then one
  ``torch.autograd.backward`` from all cut edges through the parameter-only subgraph (casts,
  transposes) into the AccumulateGrad nodes.
* Compute: B costs the input-gradient work only and W the weight-gradient work only (plus a
  Python graph walk per B, linear in the number of autograd nodes, and one engine call per
  weight-bearing node in W). A custom ``autograd.Function`` computes whatever its backward
  computes: one that always returns its weight gradient (e.g. a hand-written FP8 linear that
  ignores ``ctx.needs_input_grad``) does that work in B too, and again in W.
* Activation recomputation: a recomputed region's tensors are rebuilt when B unpacks them and
  handed out once; W's engine calls unpack them again and rebuild them (one rerun per region in
  W, in the intermediates' creation order: the same on every rank when the rerun communicates).
* Memory between B and W: B drops the output edge, the stage input and the received output
  gradient, so the part of the graph between the output and the last intermediate (e.g. the
  final activation function's saved tensors) is freed after B. What stays until W: every node
  reachable from the intermediates -- in practice the saved inputs of the weight-bearing ops
  (what the weight gradient needs: DeepSeek's ``WeightGradStore`` keeps the same) but also the
  saved tensors of input-side nodes below them that the engine cannot release individually --
  plus one stored gradient per intermediate output (the size of that op's output activation).
  So a micro-batch whose W is deferred holds close to its full forward activations plus its
  stored gradients until W; the simulator's ``live_activations`` counts it as live until W.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge


def _grad_node(t: torch.Tensor):
    """The autograd node a gradient w.r.t. ``t`` flows into (its grad_fn, or its AccumulateGrad)."""
    if not t.requires_grad:
        return None
    return get_gradient_edge(t).node


class _DeferredWeightGrad:
    """The weight-gradient half of a split backward: what W runs (see the module docstring)."""

    def __init__(self, intermediates: List[Tuple[Any, Tuple[Optional[torch.Tensor], ...], List[int]]],
                 whole: Optional[Tuple[Any, Optional[torch.Tensor]]] = None,
                 params: Optional[List[torch.Tensor]] = None):
        # (node, the gradients it received in B, positions of its cut edges in node.next_functions)
        self.intermediates = intermediates
        self.whole = whole                        # (root, grad): run the whole backward in W
        self.params = params                      # whole backward: restrict to these leaves

    def run(self) -> None:
        if self.whole is not None:
            root, grad = self.whole
            self.whole = None
            torch.autograd.backward([root], None if grad is None else [grad], inputs=self.params)
            return
        edge_grads: Dict[Tuple[int, int], torch.Tensor] = {}
        edge_nodes: Dict[Tuple[int, int], Tuple[Any, int]] = {}
        items, self.intermediates = self.intermediates, []
        for node, grads, cut in items:
            outs = [GradientEdge(node, k) for k, g in enumerate(grads) if g is not None]
            if not outs or not cut:
                continue
            # Re-run this intermediate for its weight-side outputs only: the engine computes an
            # output when its edge leads to a requested input, so requesting the cut edges' targets
            # skips the input side (B did it). A post-hook reads the per-edge gradients: a target
            # shared with another intermediate (tied weights, one cast used twice) also collects
            # what flows in through the other, so its capture is not the per-edge value. (In that
            # case the engine also re-walks the input side between the two uses: wasted, correct.)
            targets = list(dict.fromkeys(node.next_functions[i] for i in cut))
            out: List[Tuple[Optional[torch.Tensor], ...]] = []
            handle = node.register_hook(lambda grad_inputs, grad_outputs: out.append(tuple(grad_inputs)))
            try:
                torch.autograd.grad(outs, [GradientEdge(n, nr) for n, nr in targets],
                                    [g for g in grads if g is not None], retain_graph=True, allow_unused=True)
            finally:
                handle.remove()
            if len(out) != 1:
                raise RuntimeError(f"weight gradient: {node.name()} ran {len(out)} times, expected once")
            for i in cut:
                g = out[0][i]
                if g is None:
                    continue
                n, nr = node.next_functions[i]
                key = (id(n), nr)
                if key in edge_grads:
                    edge_grads[key] = edge_grads[key] + g
                else:
                    edge_grads[key] = g
                    edge_nodes[key] = (n, nr)
        del items
        if edge_grads:
            # The cut edges separate the graph: what crosses them, pushed through the
            # parameter-only subgraph (casts, transposes) into AccumulateGrad, is the weight gradient.
            keys = list(edge_grads)
            torch.autograd.backward([GradientEdge(*edge_nodes[k]) for k in keys], [edge_grads[k] for k in keys])


def _split_input_backward(root, grad: Optional[torch.Tensor], x: torch.Tensor
                          ) -> Tuple[Optional[torch.Tensor], _DeferredWeightGrad]:
    """B of the split backward: d(root)/dx now, the weight gradient deferred (module docstring)."""
    root_node = root.node if isinstance(root, GradientEdge) else _grad_node(root)
    x_node = _grad_node(x)
    # Walk the graph once: every node reachable from the root, and who consumes whom.
    consumers: Dict[Any, List[Any]] = defaultdict(list)
    seen = {root_node}
    queue = deque([root_node])
    while queue:
        node = queue.popleft()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            consumers[nxt].append(node)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
    if x_node not in seen:                    # the output does not depend on the input
        return None, _DeferredWeightGrad([], whole=(root, grad))
    closure = {x_node}                        # nodes whose backward reaches the input
    queue = deque([x_node])
    while queue:
        for user in consumers[queue.popleft()]:
            if user not in closure:
                closure.add(user)
                queue.append(user)
    cut: Dict[Any, List[int]] = {}            # intermediate -> positions of its weight-side edges
    # In creation order, not the set's (addresses differ between ranks): W runs the intermediates in
    # this order, and a W that reruns forward code (activation recomputation) issues its collectives
    # in it, which must be the same on every rank of a group.
    for node in sorted(closure, key=lambda n: n._sequence_nr()):
        positions = [i for i, (nxt, _) in enumerate(node.next_functions) if nxt is not None and nxt not in closure]
        if positions:
            cut[node] = positions
    del consumers, seen, closure

    captured: Dict[Any, Tuple[Optional[torch.Tensor], ...]] = {}
    handles = []
    for node in cut:
        def hook(grad_outputs, node=node):
            captured[node] = tuple(grad_outputs)
        handles.append(node.register_prehook(hook))
    try:
        (gx,) = torch.autograd.grad([root], [x], None if grad is None else [grad], retain_graph=True,
                                    allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return gx, _DeferredWeightGrad([(node, captured[node], positions) for node, positions in cut.items()
                                    if node in captured])
