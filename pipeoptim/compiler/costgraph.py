"""The cost graph: a model's graph with a measured cost on every node, as plain data.

A :class:`CostGraph` is all the partitioner needs, so a saved profile can be re-planned for
other stage counts, memory limits or bandwidths without the model. It is saved as JSON
(schema :data:`SCHEMA`). Cost graphs in the neutral format of ``../shared/profiles``
(``pipeoptim-neutral-cost-graph/1``, measured on a GPU) load with :meth:`CostGraph.load` too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeoptim.compiler.cost_node import CostNode
from pipeoptim.compiler.graph_checks import check_graph
from pipeoptim.errors import ProfileError
from pipeoptim.fileio import write_json

SCHEMA = "pipeoptim-profile/1"
NEUTRAL_FORMAT = "pipeoptim-neutral-cost-graph/1"


@dataclass
class CostGraph:
    """A model's cost graph.

    Attributes:
        model: model name (class name, or the name given in a neutral file).
        nodes: nodes in a topological order.
        batch_size: micro-batch size the costs were measured at.
        key: what the profile is valid for: ``graph_hash``, ``inputs`` (shapes and dtypes),
            ``device``, ``torch`` (version). A saved profile is reused only on an equal key.
        source: how the graph was obtained (``fx``, ``export`` or a free text).
        tied: shared parameters ``{name used in the graph: [aliases]}``.
        info: free-form extras (repeats, wall time of profiling, static batch flag, ...).
    """

    model: str
    nodes: list[CostNode]
    batch_size: int
    key: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    tied: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    #: read from a file whose ``content_hash`` matched its content (as :meth:`save` writes it):
    #: only such a profile is reused from the cache, where a hand edit of a well-formed value
    #: (``batch_size`` 64 for 32, a shape in ``out_meta``, an ``info`` flag) crashed a worker
    sealed: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name = {n.name: i for i, n in enumerate(self.nodes)}
        self._users: list[list[int]] | None = None
        if len(self._by_name) != len(self.nodes):
            raise ProfileError(f"cost graph {self.model!r} has duplicate node names")
        for node in self.nodes:
            for inp in node.inputs:
                if self._by_name.get(inp, len(self.nodes)) >= self._by_name[node.name]:
                    raise ProfileError(
                        f"cost graph {self.model!r}: node {node.name!r} reads {inp!r}, which is "
                        "missing or comes later; nodes must be in topological order"
                    )
            for changed in node.mutates:
                if self._by_name.get(changed, len(self.nodes)) > self._by_name[node.name]:
                    raise ProfileError(
                        f"cost graph {self.model!r}: node {node.name!r} changes {changed!r} in "
                        "place, which is missing or comes later; re-create the profile"
                    )

    def index(self, name: str) -> int:
        """Position of node ``name`` in :attr:`nodes`."""
        return self._by_name[name]

    def users(self) -> list[list[int]]:
        """For each node index, the indices of the nodes that read its output (cached)."""
        if getattr(self, "_users", None) is None:
            result: list[list[int]] = [[] for _ in self.nodes]
            for i, node in enumerate(self.nodes):
                for inp in node.inputs:
                    result[self._by_name[inp]].append(i)
            self._users = result
        return self._users

    @property
    def key_hash(self) -> str:
        """sha256 of :attr:`key` (first 16 hex digits), used in profile file names."""
        text = json.dumps(self.key, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def total_time_s(self) -> float:
        """Sum of forward and backward seconds of all nodes."""
        return sum(n.time_s for n in self.nodes)

    @property
    def total_param_bytes(self) -> int:
        """Bytes of all trainable parameters (each shared parameter once)."""
        return sum(n.param_bytes for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        """The profile as :meth:`save` writes it, sealed with its ``content_hash``."""
        data = {
            "schema": SCHEMA,
            "model": self.model,
            "batch_size": self.batch_size,
            "key": self.key,
            "key_hash": self.key_hash,
            "source": self.source,
            "tied": self.tied,
            "info": self.info,
            "nodes": [asdict(n) for n in self.nodes],
        }
        return {**data, "content_hash": content_hash(data)}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cost graph as JSON, atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> CostGraph:
        """Build from :meth:`to_dict` output or from the neutral cost-graph format, and
        :meth:`validate` the costs.

        Raises:
            ProfileError: unknown schema or format version, missing fields or bad costs; the
                message names the file and, for costs, the node.
        """
        if not isinstance(data, dict):
            raise ProfileError(
                f"{origin}: the top level is a JSON {_json_kind(data)}, not an object; give a profile "
                f"({SCHEMA!r}) or a cost graph ({NEUTRAL_FORMAT!r})"
            )
        if "format" in data:
            if data["format"] != NEUTRAL_FORMAT:
                raise ProfileError(
                    f"{origin}: cost-graph format {data['format']!r} is not supported; this pipeoptim "
                    f"reads {NEUTRAL_FORMAT!r} and {SCHEMA!r}: convert the file or update pipeoptim"
                )
            graph = _from_neutral(data, origin)
        else:
            graph = _from_profile(cls, data, origin)
        graph.validate(origin)
        return graph

    def validate(self, origin: str = "<dict>") -> None:
        """Check that the costs can be planned with.

        Raises:
            ProfileError: a time that is not seconds from 0 to
                :data:`~pipeoptim.units.MAX_SECONDS` or a size not bytes from 0 to
                :data:`~pipeoptim.units.MAX_BYTES` (the node is named: 1e308 s planned as if
                valid, 1e30 bytes overflowed), no ``output`` node, no node that does work, a
                ``batch_size`` that is not a positive whole number (``"64"`` or 8.7 were
                read as 64 and 8), or ``tied`` not ``{name: [aliases]}``.
        """
        check_graph(self, origin)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostGraph:
        """Read a profile or neutral cost-graph JSON file.

        Raises:
            ProfileError: the file is missing, unreadable, not UTF-8, truncated, not JSON, of
                another schema or format version, or has bad costs (:meth:`validate`).
        """
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc.strerror}; check the path") from exc
        except UnicodeDecodeError as exc:
            raise ProfileError(
                f"profile {path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                f"{exc.start}); give a JSON profile or cost graph"
            ) from exc
        if not text.strip():
            raise ProfileError(f"profile {path} is empty; give a JSON profile or cost graph")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProfileError(
                f"profile {path} is not valid JSON ({exc.msg}: line {exc.lineno}, column "
                f"{exc.colno}; truncated or corrupt); give a complete JSON profile or cost graph"
            ) from exc
        return cls.from_dict(data, str(path))


#: what :func:`pipeoptim.compiler.profile.profile_model` writes in ``info`` and compile reads
_INFO_FLAGS = ("static_batch", "dynamic_length")


def _json_kind(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _from_profile(cls: type[CostGraph], data: dict[str, Any], origin: str) -> CostGraph:
    """A :data:`SCHEMA` file as written by :meth:`CostGraph.save`."""
    schema = data.get("schema")
    if schema is None:
        raise ProfileError(
            f"{origin}: neither a profile (no 'schema': {SCHEMA!r}) nor a cost graph (no 'format': "
            f"{NEUTRAL_FORMAT!r}); give a file pipeoptim wrote or one in the neutral format"
        )
    if isinstance(schema, str) and schema.startswith("pipeoptim-plan/"):
        raise ProfileError(
            f"{origin} is a saved plan, not a profile: give --profile the profile it was made from "
            "(a file under profiles/), or train with the plan itself: pipeoptim.compile(..., plan=PATH)"
        )
    if schema != SCHEMA:
        raise ProfileError(
            f"{origin}: profile schema {schema!r} is not {SCHEMA!r}; delete a cached profile (it "
            "is re-measured on the next run) or re-create the file with this pipeoptim version"
        )
    if "content_hash" in data and data["content_hash"] != content_hash(data):  # first: it names the edit
        raise ProfileError(
            f"{origin}: content_hash does not match the content: the file was edited after "
            "pipeoptim wrote it; delete it to measure again, or drop the content_hash field and give "
            "it to `pipeoptim partition --profile FILE` to plan from it as edited (a profile folder "
            "reuses only the profiles pipeoptim wrote)"
        )
    if not isinstance(
        data.get("key", {}), dict
    ):  # null failed in the CLI with an AttributeError (helper-136)
        raise ProfileError(
            f"{origin}: malformed profile (key not an object); re-create it with this pipeoptim version"
        )
    try:
        nodes = [_profile_node(n, origin) for n in data["nodes"]]
        graph = cls(
            model=data["model"],
            nodes=nodes,
            batch_size=data["batch_size"],
            key=data.get("key", {}),
            source=data.get("source", ""),
            tied=data.get("tied", {}),
            info=data.get("info", {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(
            f"{origin}: malformed profile ({exc}); re-create it with this pipeoptim version"
        ) from exc
    if data.get("key_hash") not in (None, graph.key_hash):
        raise ProfileError(f"{origin}: key_hash does not match its key; the file was edited")
    graph.sealed = "content_hash" in data
    info = graph.info
    if not isinstance(info, dict) or [k for k in _INFO_FLAGS if not isinstance(info.get(k), bool)]:
        # compile reads them: a profile without them ran a fixed-batch model as a split one
        raise ProfileError(
            f"{origin}: info {info!s:.80} lacks the flags {', '.join(_INFO_FLAGS)} (true or false) "
            "that pipeoptim writes; re-measure the profile"
        )
    return graph


def _profile_node(n: Any, origin: str) -> CostNode:
    """A node of a :data:`SCHEMA` file, every field of :class:`CostNode` given (a missing cost
    was planned as 0: a node without ``fwd_s`` took no time)."""
    if not isinstance(n, dict):
        raise TypeError(f"a node is a JSON {_json_kind(n)}, not an object")
    missing = [f.name for f in fields(CostNode) if f.name not in n]
    if missing:
        raise ProfileError(
            f"{origin}: node {n.get('name', '?')!r} has no {', '.join(map(repr, missing))}; every node of "
            "a profile needs it: restore it, or delete the profile to measure it again"
        )
    return CostNode(**n)


def _from_neutral(data: dict[str, Any], origin: str) -> CostGraph:
    """Import a ``pipeoptim-neutral-cost-graph/1`` file (see ``../shared/profiles/README.md``).

    That format has no gradient or saved-activation sizes: ``grad_bytes`` is taken equal to
    ``out_bytes`` for nodes that need a backward pass (``bwd_s > 0`` or parameters upstream)
    and ``saved_bytes`` equal to ``out_bytes`` of compute nodes, the usual first-order estimate.
    """
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list):
        raise ProfileError(f"{origin}: malformed neutral cost graph: 'nodes' is not a list of nodes")
    nodes = [_neutral_node(n, i, origin) for i, n in enumerate(raw_nodes)]
    try:
        return CostGraph(
            model=str(data["model"]),
            nodes=nodes,
            batch_size=data["batch_size"],
            key={"device": data.get("device", ""), "torch": data.get("torch", "")},
            source=data.get("source", NEUTRAL_FORMAT),
            info={"format": NEUTRAL_FORMAT, "input_shape": data.get("input_shape")},
        )
    except KeyError as exc:
        raise ProfileError(
            f"{origin}: malformed neutral cost graph: no {exc.args[0]!r} at the top level"
        ) from exc
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{origin}: malformed neutral cost graph ({exc})") from exc


def _neutral_node(n: Any, i: int, origin: str) -> CostNode:
    name = n.get("name", f"#{i}") if isinstance(n, dict) else f"#{i}"
    try:
        compute = n["op"] in ("call_module", "call_function", "call_method")
        out_bytes = _size(n["out_bytes"], "out_bytes")
        return CostNode(
            name=str(n["name"]),
            op=n["op"],
            target=str(n["target"]),
            inputs=_list(n["inputs"], "inputs"),
            fwd_s=float(_number(n["fwd_s"], "fwd_s")),
            bwd_s=float(_number(n["bwd_s"], "bwd_s")),
            out_bytes=out_bytes,
            grad_bytes=out_bytes if n["op"] != "placeholder" else 0,
            param_bytes=_size(n["param_bytes"], "param_bytes"),
            params=_list(n.get("params", []), "params"),
            saved_bytes=out_bytes if compute else 0,
            module=n.get("module", ""),
            module_type=n.get("module_type", ""),
        )
    except KeyError as exc:
        raise ProfileError(f"{origin}: node {name!r} has no {exc.args[0]!r}; every node needs it") from exc
    except (TypeError, ValueError) as exc:
        raise ProfileError(f"{origin}: node {name!r} is malformed ({exc}); fix that node") from exc


def _number(value: Any, field: str) -> int | float:
    """A JSON number as it is; a string or boolean (``"12"``, ``true``) is refused, not read
    as one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{field} = {value!r} is not a number")
    return value


def _list(value: Any, field: str) -> list[Any]:
    """A JSON list as a list; a string is refused (``list("conv1")`` would name five inputs)."""
    if not isinstance(value, list):
        raise TypeError(f"{field} = {value!r} is not a list")
    return list(value)


def _size(value: Any, field: str) -> int:
    """A byte count: an integer, or a float with an integer value (``1e6``)."""
    number = float(_number(value, field))
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{field} = {value!r} is not a whole number of bytes")
    return int(number)


def content_hash(data: dict[str, Any]) -> str:
    """sha256 (first 16 hex digits) of a profile's JSON without its ``content_hash`` field."""
    body = {k: v for k, v in data.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
