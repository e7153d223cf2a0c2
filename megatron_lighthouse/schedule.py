"""``LighthouseSchedule``: which iterations each Lighthouse layer runs Lighthouse, blends, or runs dense.

Pure arithmetic on iteration numbers, importable without megatron-core; :meth:`LighthouseSchedule.apply` sets a
model's :class:`~megatron_lighthouse.core_attention.LighthouseCoreAttention` layers accordingly.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Mapping, Union

if TYPE_CHECKING:
    from .switch import Model


@dataclasses.dataclass(frozen=True)
class LighthouseSchedule:
    """The paper's recipe: Lighthouse for iterations ``< dense_from_iteration``, dense from then on.

    ``dense_from_iteration=None`` keeps Lighthouse on throughout. Four additions, not in the paper:

    - ``lighthouse_from_iteration=P`` runs the first ``P`` iterations densely (a dense prefix), Lighthouse from
      iteration ``P`` on; the prefix is not part of the Lighthouse stage.
    - ``dense_every=N`` also runs every ``N``-th iteration of the Lighthouse stage densely (iterations with
      ``(iteration + 1) % N == 0``), so the model keeps training its dense attention while Lighthouse does most
      steps.
    - ``layer_interval=K`` switches the Lighthouse layers one at a time, lowest first, ``K`` iterations apart, the
      last at ``dense_from_iteration``: of ``n`` Lighthouse layers, the ``j``-th (0-based, in layer order) runs
      dense from ``dense_from_iteration - (n - 1 - j) * K``. Every layer is dense from ``dense_from_iteration`` on,
      as without it.
    - ``blend_iterations=B`` blends each layer into dense attention over the ``B`` iterations before its switch:
      at iteration ``switch - B + i`` (``i`` in ``0..B-1``) the layer returns ``(1 - w) * Lighthouse + w * dense``
      with ``w = (i + 1) / (B + 1)`` (:attr:`LighthouseCoreAttention.dense_weight`), computing both.

    Call :meth:`apply` once per iteration (cheap). Invalid settings raise ``ValueError`` at construction, naming
    the field and the rule, or the caller's own name for it when given ``names`` (see below).
    """

    dense_from_iteration: Union[int, None] = None
    dense_every: Union[int, None] = None
    layer_interval: int = 0
    blend_iterations: int = 0
    lighthouse_from_iteration: int = 0

    #: What the caller calls the fields in error messages (a launcher's flags, say: ``{"layer_interval":
    #: "--layer-interval"}``); a name with a space or a leading ``-`` is followed by its value after a space, any
    #: other by ``=``. Not stored; :meth:`check_layers` takes the same mapping.
    names: dataclasses.InitVar[Union[Mapping[str, str], None]] = None

    def __post_init__(self, names: Union[Mapping[str, str], None] = None) -> None:
        def bad(field: str, rule: str) -> ValueError:
            return ValueError(f"{'' if names else 'LighthouseSchedule.'}{_setting(names, field, getattr(self, field))}"
                              f": {rule}")

        def is_int(value: object) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        it = self.dense_from_iteration
        switch = _label(names, "dense_from_iteration")
        if it is not None and (not is_int(it) or it < 0):
            raise bad("dense_from_iteration", "must be None or an int >= 0")
        every = self.dense_every
        if every is not None and (not is_int(every) or every < 2):
            raise bad("dense_every", "must be None or an int >= 2 (1 would make every iteration dense)")
        interval = self.layer_interval
        if not is_int(interval) or interval < 0:
            raise bad("layer_interval", f"must be an int >= 0 (0: every layer switches at {switch})")
        if interval and it is None:
            raise bad("layer_interval", f"needs {switch} (without a switch no layer goes dense)")
        blend = self.blend_iterations
        if not is_int(blend) or blend < 0:
            raise bad("blend_iterations", "must be an int >= 0 (0: no blend)")
        if blend and it is None:
            raise bad("blend_iterations", f"needs {switch} (the blend leads up to the switch)")
        prefix = self.lighthouse_from_iteration
        if not is_int(prefix) or prefix < 0:
            raise bad("lighthouse_from_iteration", "must be an int >= 0 (0: Lighthouse from the first iteration)")
        if prefix and it is not None and prefix >= it:
            raise bad("lighthouse_from_iteration", f"must be below {_setting(names, 'dense_from_iteration', it)}, "
                                                   "or no iteration would run Lighthouse")

    def check_layers(self, count: int, names: Union[Mapping[str, str], None] = None) -> None:
        """``ValueError`` unless ``count`` Lighthouse layers fit the schedule: the first one's blend start,
        ``dense_from_iteration - (count - 1) * layer_interval - blend_iterations``, must not fall before
        ``lighthouse_from_iteration`` (0 by default). ``names``: as the constructor's."""
        first, start = self.switch_iteration(0, count), self.blend_start(0, count)
        prefix = self.lighthouse_from_iteration
        if start is None or start >= prefix:
            return
        in_play = [f for f in ("layer_interval", "blend_iterations", "lighthouse_from_iteration") if getattr(self, f)]
        terms = [_label(names, "lighthouse_from_iteration") if prefix else "",
                 f"(layers - 1) * {_label(names, 'layer_interval')}" if self.layer_interval else "",
                 _label(names, "blend_iterations") if self.blend_iterations else ""]
        needed = prefix + (count - 1) * self.layer_interval + self.blend_iterations
        given = ", ".join(_setting(names, f, getattr(self, f)) for f in in_play)
        raise ValueError(
            f"{'' if names else 'LighthouseSchedule: '}{given} with {count} Lighthouse layers and "
            f"{_setting(names, 'dense_from_iteration', self.dense_from_iteration)}: the first layer would switch at "
            f"iteration {first}"
            f"{f' and start its blend at {start}' if self.blend_iterations else ''}; needs "
            f"{_label(names, 'dense_from_iteration')} >= {' + '.join(t for t in terms if t)} = {needed}")

    def switch_iteration(self, index: int = 0, count: int = 1) -> Union[int, None]:
        """The first dense iteration of Lighthouse layer ``index`` of ``count`` (``None``: Lighthouse throughout)."""
        if self.dense_from_iteration is None:
            return None
        return self.dense_from_iteration - (count - 1 - index) * self.layer_interval

    def blend_start(self, index: int = 0, count: int = 1) -> Union[int, None]:
        """The first blending iteration of Lighthouse layer ``index`` of ``count``: its switch less
        ``blend_iterations`` (its switch when there is no blend; ``None``: Lighthouse throughout)."""
        switch = self.switch_iteration(index, count)
        return None if switch is None else switch - self.blend_iterations

    def in_lighthouse_stage(self, iteration: int) -> bool:
        """Whether ``iteration`` is past the dense prefix and before the switch of the last layer (``dense_every``
        steps included)."""
        return iteration >= self.lighthouse_from_iteration and (
            self.dense_from_iteration is None or iteration < self.dense_from_iteration)

    def enabled_at(self, iteration: int, index: int = 0, count: int = 1) -> bool:
        """Whether Lighthouse layer ``index`` of ``count`` runs Lighthouse at ``iteration``."""
        switch = self.switch_iteration(index, count)
        interleaved_dense = self.dense_every is not None and (iteration + 1) % self.dense_every == 0
        return (self.lighthouse_from_iteration <= iteration and (switch is None or iteration < switch)
                and not interleaved_dense)

    def dense_weight_at(self, iteration: int, index: int = 0, count: int = 1) -> float:
        """The dense weight of Lighthouse layer ``index`` of ``count`` at ``iteration`` while it runs Lighthouse
        (0 outside its blend; see ``blend_iterations``)."""
        start = self.blend_start(index, count)
        if start is None or not start <= iteration < self.switch_iteration(index, count):
            return 0.0
        return (iteration - start + 1) / (self.blend_iterations + 1)

    def apply(self, model: "Model", iteration: int) -> int:
        """Set ``model``'s Lighthouse layers for ``iteration``; returns how many run Lighthouse (0: all dense).

        A layer's place in the order is :attr:`LighthouseCoreAttention.lighthouse_position`, so each pipeline
        stage, holding some of the layers, switches them when the whole model would."""
        from .switch import lighthouse_modules  # megatron-core, on first use

        modules = lighthouse_modules(model)
        for count in {module.lighthouse_position[1] for module in modules}:
            self.check_layers(count)
        for module in modules:
            module.enabled = self.enabled_at(iteration, *module.lighthouse_position)
            module.dense_weight = self.dense_weight_at(iteration, *module.lighthouse_position)
        return sum(module.enabled for module in modules)


def _label(names: Union[Mapping[str, str], None], field: str) -> str:
    """What the caller calls ``field`` (the field's own name without a mapping)."""
    return (names or {}).get(field, field)


def _setting(names: Union[Mapping[str, str], None], field: str, value: object) -> str:
    """``field=value`` in the caller's words: ``--layer-interval 3``, ``the switch step 5``, ``layer_interval=3``."""
    label = _label(names, field)
    return f"{label}{' ' if ' ' in label or label.startswith('-') else '='}{value!r}"
