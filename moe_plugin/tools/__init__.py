"""Tools around training runs: checkpoint resharding and integrity (``reshard``,
``checkpoints``), routing analysis (``analysis``), the results report (``report``).
Each is a ``python -m moe_plugin.tools.<name>`` command; none is imported by the core or
the fairseq shell."""
