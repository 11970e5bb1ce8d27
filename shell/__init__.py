"""The shell: everything real use needs that the method does not. The flags and their checks (cli), a run's
resume and checkpoints (runner, checkpoint), comparisons and reports (compare), the baselines, Flower
(flower_app) and the privacy audit (privacy). The core (train.py and the files beside it) never imports it."""
