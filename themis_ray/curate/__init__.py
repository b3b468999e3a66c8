"""Curation: IFD filters, per-scenario rebalancing, scenario mix, a stratified split, augmentation.

- `rules`: the rules, keyed by id (`curate_rule` beside the human-readable `reject_reason`), and how a
  block of rows is decided from a `Plan` of figures;
- `keys`: the seeded per-row draws and the sortable keys of the exact top-k cut and split;
- `stats`: the map-side figures (each block reduced to summable numbers) and the written parts' statistics;
- `plan`: the driver's passes that build the plan, and the streaming map that applies it;
- `augment`: the copies of kept train records (paraphrased criteria, dropped criteria, other rating
  scales) and pairwise order swapping;
- `report`: `report.md` and its plots, from the aggregated figures.

The stage (`themis_ray.stages.curate`) runs them as Ray Data plans; nothing here imports a stage.
"""
