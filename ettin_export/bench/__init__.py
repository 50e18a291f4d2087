"""Speed against the baseline in the same run (measure.py): contenders, interleaved timed passes,
medians, ratios, machine load, FLOP/s. The command is ettin_export.commands.bench."""
