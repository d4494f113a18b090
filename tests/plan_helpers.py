"""The schedule pass alone, as the compile stage calls it, without tracing a teacher."""
from monomod.compiler.options import options_dict, validate
from monomod.compiler.stage import with_family_defaults
from monomod.passes.schedule import schedule
from monomod.plan import PartitionRecord


def compile_plan(options, data):
    """Validate ``options`` and lay out their plan, with stand-in cuts (one module per block group)."""
    validate(options_dict(options))
    cuts = options.cuts or [f"blocks.{i}" for i in range(1, options.modules)]
    return schedule(with_family_defaults(options), data, PartitionRecord(cuts=tuple(cuts)))
