"""Model lifecycle: publishing a trained run (`publish`), promotion and rollback with
re-indexing into the new version's collection and the serving alias (`reindex`),
reconcile (`reconcile`), the labelling queue (`labelling`) and the retrain job that
closes the data flywheel (`retrain`: labelled images into a training set, train, promote
only when at least as good). May import: the platform, the ingest stages (decode, embed),
data (the training set a retrain writes) and training (the run it publishes); never
monitoring, ui or cli."""
