"""``tools/run_table.py``'s parts: the plan of a table (:mod:`.plan`), the local executor (:mod:`.local`), the
SLURM executor (:mod:`.slurm`) and the outcomes, status and aggregated table (:mod:`.status`)."""
