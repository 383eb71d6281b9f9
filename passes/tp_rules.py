"""Tensor-parallel (Megatron) rules derived from a program's dataflow, never from names.

`derive_tp_rules` traces `fn(params, *args)` to a jaxpr and follows the output-feature
dimension of every matmul against a parameter (a column-parallel candidate) through the ops
that keep it local: elementwise ops (a bias added along it is sharded too), broadcasts,
reshapes that split it into (heads, head_dim), transposes, matmuls that carry it as a batch
or free dimension, reductions over other dimensions, pjit / remat / custom_jvp calls and
scan bodies; until a matmul contracts it against another parameter (the row-parallel
partner). Column members that meet (q, k, v; gate, up) form one group. A group whose
tracked dimension would need communication anywhere (reduced over, contracted with an
activation, gathered, returned) is rejected with the reason.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
from jax.sharding import PartitionSpec as P

from passes.compat import CALL_PRIMITIVES
from passes.plan import TENSOR

PyTree = Any
log = logging.getLogger("ap_xla")

# Calls whose sub-jaxpr takes exactly the call's operands: traced through as if inlined
# (their names differ across jax versions: passes/compat.py).
_CALLS = CALL_PRIMITIVES
# Ops that keep a parameter's layout (a derived value still "is" the parameter).
_UNARY = {"convert_element_type", "copy", "copy_p", "reduce_precision", "sharding_constraint",
          "name"}  # name: checkpoint_name, the value itself
_ELEMENTWISE = _UNARY | {
    "add", "sub", "mul", "div", "max", "min", "pow", "integer_pow", "neg", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "erf", "erfc", "erf_inv", "sqrt", "rsqrt", "cbrt", "abs",
    "sign", "sin", "cos", "tan", "square", "floor", "ceil", "round", "rem", "atan2", "select_n",
    "clamp", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not", "xor", "is_finite",
    "stop_gradient", "nextafter", "real", "imag"}
_along = lambda key: lambda p, i, o, d: None if p[key] == d else d
_reduce = lambda p, i, o, d: None if d in p["axes"] else d - sum(a < d for a in p["axes"])
_whole = lambda p, i, o, d: d if i[d] == o[d] else None
# Where a shape op moves the tracked dim d (None: it acts along d, which needs communication);
# arguments: the op's params, the tracked operand's shape, the output shape, d.
_MOVES = {
    "transpose": lambda p, i, o, d: list(p["permutation"]).index(d),
    "broadcast_in_dim": lambda p, i, o, d: p["broadcast_dimensions"][d],
    "squeeze": lambda p, i, o, d: d - sum(a < d for a in p["dimensions"]),
    "reshape": lambda p, i, o, d: _reshape_dim(i, o, d),
    "rev": lambda p, i, o, d: None if d in p["dimensions"] else d,
    "pad": lambda p, i, o, d: d if tuple(p["padding_config"][d]) == (0, 0, 0) else None,
    "slice": _whole, "dynamic_slice": _whole,
    "split": _along("axis"), "concatenate": _along("dimension"), "sort": _along("dimension"),
    **{k: _along("axis") for k in ("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")},
    **{k: _reduce for k in ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and",
                            "reduce_or", "reduce_xor", "argmax", "argmin")},
}


@dataclasses.dataclass(frozen=True)
class TPGroup:
  """Parameters sharded together over the tensor axis: (path, dim) per member.

  `size` is the number of units the tracked dimension splits into evenly (heads, hidden
  features): the group shards for a tensor-axis size `tp` when `size % tp == 0`.
  """
  columns: tuple[tuple[str, int], ...]
  rows: tuple[tuple[str, int], ...]
  aligned: tuple[tuple[str, int], ...]
  size: int
  reason: str | None = None

  @property
  def members(self) -> tuple[tuple[str, int], ...]:
    return self.columns + self.rows + self.aligned

  def __repr__(self):
    f = lambda ms: "[" + ", ".join(f"{p}:{d}" for p, d in ms) + "]"
    s = f"TPGroup(size={self.size}, columns={f(self.columns)}, rows={f(self.rows)}"
    s += f", aligned={f(self.aligned)}" if self.aligned else ""
    return s + (f", rejected={self.reason!r})" if self.reason else ")")


@dataclasses.dataclass(frozen=True)
class TPRules:
  """Which dimension of each parameter to shard over the tensor axis.

  Attributes:
    groups: the column/row groups found.
    rejected: groups dropped, each with its `reason`.
    leaf_dims: per parameter leaf (flattened order) the dim to shard, or None.
    paths, ndims, treedef: the parameters' paths, ranks and tree structure.
  """
  groups: tuple[TPGroup, ...]
  rejected: tuple[TPGroup, ...]
  leaf_dims: tuple[int | None, ...] = dataclasses.field(repr=False)
  paths: tuple[str, ...] = dataclasses.field(repr=False)
  ndims: tuple[int, ...] = dataclasses.field(repr=False)
  treedef: Any = dataclasses.field(repr=False)

  @property
  def dims(self) -> PyTree:
    """Pytree like the params with the dim to shard per leaf (int) or None."""
    return self.treedef.unflatten(list(self.leaf_dims))

  def _sharded_groups(self, tp: int) -> list[TPGroup]:
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
      raise ValueError(f"tp must be a positive int (the size of the tensor axis), got {tp!r}.")
    return [g for g in self.groups if g.size % tp == 0]

  def specs(self, tp: int, axis: str = TENSOR, prefix: tuple = ()) -> PyTree:
    """PartitionSpec per parameter leaf for a tensor axis of size `tp`.

    Args:
      tp: the size of the tensor axis; groups whose `size` it does not divide stay replicated.
      axis: the mesh axis name.
      prefix: specs of leading dims the leaves gain (e.g. `(None,)` for stacked layers).

    Example:
      >>> rules = derive_tp_rules(loss, params, batch)
      >>> shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), rules.specs(4))
    """
    if not isinstance(prefix, tuple):
      raise TypeError(f"prefix must be a tuple of mesh axis names or None, got {prefix!r}.")
    ok = {p for g in self._sharded_groups(tp) for p, _ in g.members}
    specs = []
    for path, nd, d in zip(self.paths, self.ndims, self.leaf_dims):
      spec = [None] * nd
      if d is not None and path in ok:
        spec[d] = axis
      specs.append(P(*prefix, *spec))
    return self.treedef.unflatten(specs)

  def unshardable(self, tp: int) -> list[str]:
    """Why each group stays replicated for a tensor axis of size `tp`."""
    ok = self._sharded_groups(tp)
    return [f"{g!r}: its tracked dim has {g.size} units (heads or features), not divisible by "
            f"tp={tp}; replicated" for g in self.groups if g not in ok]

  def shardable(self, tp: int) -> bool:
    """Whether at least one group shards over a tensor axis of size `tp`."""
    return bool(self._sharded_groups(tp))

  def __repr__(self):
    n = sum(d is not None for d in self.leaf_dims)
    return (f"TPRules(groups={len(self.groups)}, rejected={len(self.rejected)}, "
            f"sharded={n}/{len(self.leaf_dims)} params)")


@dataclasses.dataclass
class _Group:
  size: int
  columns: list = dataclasses.field(default_factory=list)
  rows: list = dataclasses.field(default_factory=list)
  aligned: list = dataclasses.field(default_factory=list)
  reason: str | None = None


def _shape(v):
  return tuple(v.aval.shape)


class _Tracer:
  """Abstract interpretation of a jaxpr. A tag `(group, dim)` marks the tracked (sharded)
  dim of a value; a derivation `(leaf, dimmap)` marks a value that is a parameter leaf up to
  layout (dimmap[k]: the parameter dim of value dim k, None for broadcast dims)."""

  def __init__(self, shapes, paths):
    self.shapes, self.paths = shapes, paths
    self.parent: list[int] = []
    self.groups: list[_Group] = []
    self.owner: dict[int, tuple[int, int]] = {}  # leaf -> (group, dim)
    self.other: dict[int, str] = {}  # leaf -> an op using it outside every group

  def find(self, g):
    while self.parent[g] != g:
      g = self.parent[g]
    return g

  def union(self, a, b):
    a, b = self.find(a), self.find(b)
    if a != b:
      self.parent[b] = a
      ga, gb = self.groups[a], self.groups[b]
      ga.columns += gb.columns
      ga.rows += gb.rows
      ga.aligned += gb.aligned
      ga.size, ga.reason = math.gcd(ga.size, gb.size), ga.reason or gb.reason
    return a

  def reject(self, g, reason):
    grp = self.groups[self.find(g)]
    grp.reason = grp.reason or reason

  def member(self, g, role, leaf, dim):
    if leaf in self.owner:
      g2, d2 = self.owner[leaf]
      if d2 == dim:
        g = self.union(g, g2)
      else:
        why = f"parameter {self.paths[leaf]} would be sharded on dim {d2} and dim {dim}"
        self.reject(g, why), self.reject(g2, why)
    else:
      self.owner[leaf] = (g, dim)
    grp = self.groups[self.find(g)]
    getattr(grp, role).append((leaf, dim))
    grp.size = math.gcd(grp.size, self.shapes[leaf][dim])

  def new(self, leaf, dim):
    self.parent.append(len(self.parent))
    self.groups.append(_Group(self.shapes[leaf][dim]))
    self.member(len(self.parent) - 1, "columns", leaf, dim)
    return len(self.parent) - 1

  def use(self, d, op):
    if d:
      self.other.setdefault(d[0], op)

  def align(self, g, d, shape, dim, size, op):
    """A parameter-derived operand meeting the tracked dim: shard it along (a bias)."""
    pd = d[1][dim] if len(shape) > dim else None
    if pd is not None and shape[dim] == size and self.shapes[d[0]][pd] == size:
      self.member(g, "aligned", d[0], pd)
    else:
      self.use(d, op)

  def run(self, jaxpr: Jaxpr, tags, ders):
    """Tags and derivations of `jaxpr`'s outputs given those of its inputs."""
    T, D = {}, {}
    for v, t, d in zip(jaxpr.invars, tags, ders):
      T[v], D[v] = t, d
    get = lambda env, v: None if isinstance(v, Literal) else env.get(v)
    for e in jaxpr.eqns:
      ts, ds = self.eqn(e, [get(T, v) for v in e.invars], [get(D, v) for v in e.invars])
      for v, t, d in zip(e.outvars, ts, ds):
        T[v], D[v] = t, d
    return [get(T, v) for v in jaxpr.outvars], [get(D, v) for v in jaxpr.outvars]

  def eqn(self, e, ts, ds):
    name, p, n = e.primitive.name, e.params, len(e.outvars)
    none = [None] * n
    if name in _CALLS:
      sub = p.get("jaxpr", p.get("call_jaxpr"))
      sub = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
      if isinstance(sub, Jaxpr) and len(sub.invars) == len(ts) and len(sub.outvars) == n:
        return self.run(sub, ts, ds)
    if name == "scan":
      return self.scan(e, ts, ds)
    if name == "dot_general":
      return [self.dot(e, ts, ds)], none
    tagged = [t for t in ts if t]
    if not tagged:
      if len(ds) == 1 and ds[0]:
        dm = _derive(name, p, _shape(e.invars[0]), _shape(e.outvars[0]), ds[0][1])
        if dm is not None:
          return none, [(ds[0][0], dm)]
      for d in ds:
        self.use(d, name)
      return none, none
    g = tagged[0][0]
    for t in tagged[1:]:
      g = self.union(g, t[0])
    dims = {t[1] for t in tagged}
    dim = tagged[0][1]
    if len(dims) > 1:
      self.reject(g, f"`{name}` combines the tracked dim at different positions {sorted(dims)}")
    in_shape, out_shape = _shape(e.invars[ts.index(tagged[0])]), _shape(e.outvars[0])
    if name in _ELEMENTWISE:
      for v, d in zip(e.invars, ds):
        if d:
          self.align(g, d, _shape(v), dim, out_shape[dim], name)
      return [(g, dim)] * n, none
    for d in ds:
      self.use(d, name)
    if name not in _MOVES:
      self.reject(g, f"the tracked dim reaches `{name}`, which is not understood or needs "
                     "communication")
      return none, none
    out = _MOVES[name](p, in_shape, out_shape, dim)
    if out is None:
      self.reject(g, f"`{name}` acts along the tracked dim (would need communication)")
      return none, none
    grp = self.groups[self.find(g)]  # a reshape splitting H*D into (H, D) leaves H units
    grp.size = math.gcd(grp.size, out_shape[out])
    return [(g, out)] * n, none

  def dot(self, e, ts, ds):
    (lc, rc), (lb, rb) = e.params["dimension_numbers"]
    con, bat, shapes = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)), [_shape(v) for v in e.invars]
    free = [[d for d in range(len(s)) if d not in con[i] + bat[i]] for i, s in enumerate(shapes)]
    pos = lambda i, d: (bat[i].index(d) if d in bat[i] else
                        len(lb) + (len(free[0]) if i else 0) + free[i].index(d))
    if not ts[0] and not ts[1]:
      for i in (1, 0):  # x @ W: the weight is usually on the right
        fd = next((f for f in free[i] if ds[i] and ds[i][1][f] is not None and shapes[i][f] > 1), None)
        if fd is not None:
          self.use(ds[1 - i], "dot_general")
          return (self.new(ds[i][0], ds[i][1][fd]), pos(i, fd))
      for d in ds:
        self.use(d, "dot_general")
      return None
    outs = set()
    for i in (0, 1):
      if not ts[i]:
        continue
      (g, d), o = ts[i], 1 - i
      if d in free[i]:
        if not ts[o]:
          self.use(ds[o], "dot_general")
        outs.add((self.find(g), pos(i, d)))
        continue
      kind = bat if d in bat[i] else con
      od = kind[o][kind[i].index(d)]
      if ts[o]:
        if ts[o][1] != od:
          self.reject(g, "a matmul meets the tracked dim with another tracked dim")
          self.reject(ts[o][0], "a matmul meets the tracked dim with another tracked dim")
        elif kind is con:
          self.reject(self.union(g, ts[o][0]), "a matmul contracts the tracked dim on both "
                      "operands (needs an all-reduce)")
        else:
          outs.add((self.union(g, ts[o][0]), pos(i, d)))
      elif kind is bat:
        if ds[o]:
          self.align(g, ds[o], shapes[o], od, shapes[i][d], "dot_general")
        outs.add((self.find(g), pos(i, d)))
      elif ds[o] and ds[o][1][od] is not None and self.shapes[ds[o][0]][ds[o][1][od]] == shapes[i][d]:
        self.member(g, "rows", ds[o][0], ds[o][1][od])  # the row-parallel partner
      else:
        self.use(ds[o], "dot_general")
        self.reject(g, "a matmul contracts the tracked dim with a non-parameter (needs an all-reduce)")
    if len({p for _, p in outs}) > 1:
      for g, _ in outs:
        self.reject(g, "a matmul output would carry two tracked dims")
    return next(iter(outs)) if outs else None

  def scan(self, e, ts, ds):
    p = e.params
    nc, nk, body = p["num_consts"], p["num_carry"], p["jaxpr"].jaxpr
    it, idd = [], []
    for j, (t, d) in enumerate(zip(ts, ds)):
      if nc <= j < nc + nk:  # a loop-carried tracked dim would need a fixed point
        if t:
          self.reject(t[0], "the tracked dim enters a scan carry")
        self.use(d, "scan carry")
        t = d = None
      elif j >= nc + nk:  # xs lose their leading (scanned) dim
        if t and t[1] == 0:
          self.reject(t[0], "a scan iterates over the tracked dim")
        t = (t[0], t[1] - 1) if t and t[1] > 0 else None
        d = (d[0], d[1][1:]) if d else None
      it.append(t), idd.append(d)
    out_t, _ = self.run(body, it, idd)
    res = []
    for j, t in enumerate(out_t):
      if t and j < nk:
        self.reject(t[0], "the tracked dim enters a scan carry")
      res.append((t[0], t[1] + 1) if t and j >= nk else None)
    return res, [None] * len(out_t)


def _derive(name, p, in_shape, out_shape, dm):
  """The dimmap of a layout-preserving op applied to a parameter (None: not layout-preserving)."""
  if name in _UNARY:
    return dm
  if name == "transpose":
    return tuple(dm[k] for k in p["permutation"])
  if name == "broadcast_in_dim":
    new = [None] * len(out_shape)
    for i, od in enumerate(p["broadcast_dimensions"]):
      new[od] = dm[i] if in_shape[i] == out_shape[od] else None
    return tuple(new)
  if name in ("reshape", "squeeze"):  # only inserting or removing size-1 dims
    kept = [(s, dm[i]) for i, s in enumerate(in_shape) if s != 1]
    if [s for s, _ in kept] != [s for s in out_shape if s != 1]:
      return None
    it = iter(kept)
    return tuple(None if s == 1 else next(it)[1] for s in out_shape)
  return None


def _reshape_dim(in_shape, out_shape, dim):
  """Where the tracked dim goes through a reshape: the output dim starting at the same outer
  offset (the leading factor of a split or merge). Block-sharding either dim into tp pieces
  is then the same partition of the elements when tp divides both sizes."""
  outer = math.prod(in_shape[:dim])
  for j, s in enumerate(out_shape):
    if math.prod(out_shape[:j]) == outer and s > 1:
      return j
  return None


def derive_tp_rules(fn: Callable, params: PyTree, *args) -> TPRules:
  """Finds Megatron column/row groups by following matmul outputs through `fn`'s jaxpr.

  Args:
    fn: `fn(params, *args)`, e.g. a block `block(block_params, hidden, aux)` or a loss
      `loss(params, batch)`. Parameter names are never looked at.
    params: pytree of arrays or `jax.ShapeDtypeStruct`s.
    *args: the other arguments (arrays or `ShapeDtypeStruct`s).

  Returns:
    `TPRules` with the dim of each parameter to shard over the tensor axis.

  Example:
    >>> rules = derive_tp_rules(lambda p, x: mlp.apply({"params": p}, x).sum(), params, x)
    >>> rules.specs(4)  # {'Dense_0': {'kernel': P(None, 'tensor'), ...}, ...}
  """
  if not callable(fn):
    raise TypeError(f"derive_tp_rules: fn must be callable, got {type(fn).__name__}.")
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = tuple(jax.tree_util.keystr(k, simple=True, separator="/") for k, _ in flat)
  shapes = [tuple(jax.numpy.shape(x)) for _, x in flat]
  jaxpr = jax.make_jaxpr(fn)(params, *args).jaxpr
  tr = _Tracer(shapes, paths)
  ders = [(i, tuple(range(len(s)))) for i, s in enumerate(shapes)]
  ders += [None] * (len(jaxpr.invars) - len(ders))
  out, _ = tr.run(jaxpr, [None] * len(jaxpr.invars), ders)
  for t in out:
    if t:
      tr.reject(t[0], "the tracked dim reaches the function output (would need an all-gather)")
  found, rejected, dims = [], [], [None] * len(shapes)
  for r in sorted({tr.find(g) for g in range(len(tr.parent))}):
    g = tr.groups[r]
    leaves = {leaf for leaf, _ in g.columns + g.rows + g.aligned}
    other = next((leaf for leaf in sorted(leaves) if leaf in tr.other), None)
    if not g.reason and other is not None:
      g.reason = f"parameter {paths[other]} is also used by `{tr.other[other]}` outside the group"
    if not g.reason and not g.rows:
      g.reason = "the tracked dim is never contracted against a parameter (no row partner)"
    named = lambda ms: tuple(sorted({(paths[leaf], d) for leaf, d in ms}))
    group = TPGroup(named(g.columns), named(g.rows), named(g.aligned), g.size, g.reason)
    (rejected if g.reason else found).append(group)
    if not g.reason:
      for leaf, d in g.columns + g.rows + g.aligned:
        dims[leaf] = d
  rules = TPRules(tuple(found), tuple(rejected), tuple(dims), paths,
                  tuple(len(s) for s in shapes), treedef)
  log.info("Derived tensor-parallel rules: %r", rules)
  for g in found + rejected:
    log.debug("tensor-parallel group %r", g)
  return rules
