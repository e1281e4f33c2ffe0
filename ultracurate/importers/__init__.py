"""Importers of published editing datasets into a workspace (anchors, edits and candidates),
so that released data can be curated like generated data: re-scored, masks classified,
rebalanced, reviewed and exported."""
