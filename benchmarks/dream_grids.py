"""The dreams next to the noise control, as a student should see them: a row per class, and how many images of
each row the new client's own model (the teacher) reads as that class.

    python benchmarks/dream_grids.py runs/map/t1-s720 --setting iterations=2000,bn_weight=10,synthesis_lr=0.05 \
        --out docs/dreams_2000.png --noise-out docs/noise_2000.png

Takes a finished `--method pfeddsh --no-replay` run with its checkpoint (see dream_map.py: its final state is
the one stage 1's replay met) and dreams from stage 1's new clients with the setting, as replay would; the
noise control's images are what `--replay-control noise` and `noise-kd` feed replay in their place.
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deepinversion as di  # noqa: E402
import train  # noqa: E402
from benchmarks.dream_map import SYNTHESIS, parse_setting  # noqa: E402
from extensions import controls  # noqa: E402
from shell import runner  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a finished --no-replay run (with checkpoint.pt)")
    parser.add_argument("--setting", default="", help="replay settings, k=v,k=v (as dream_map.py)")
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--out", required=True, help="the dreams' png")
    parser.add_argument("--noise-out", required=True, help="the noise control's png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = parse_setting(args.setting)
    config, dataset, _, server, _, _ = runner.restore_finished(args.run)
    settings = dict(train.replay_settings(config), **{k: v for k, v in setting.items() if k not in SYNTHESIS})
    _, teachers = di.who_replays(server, args.stage)
    di.synthesize = functools.partial(di.synthesize, **{SYNTHESIS[k]: v for k, v in setting.items() if k in SYNTHESIS})
    seed = config["seed"] + args.stage
    dreamed, _, bn_end = di.dream(server, teachers, num_images=settings["num_images"],
                                  iterations=settings["iterations"], bn_weight=settings["bn_weight"], seed=seed)
    drawn = controls.noise_dreams(server, teachers, num_images=settings["num_images"], seed=seed)
    noise = controls.read_by_teachers(server, drawn)        # the same images, as noise-kd labels them
    for (path, parts) in ((args.out, dreamed), (args.noise_out, None)):
        if parts is None:       # noise images with the labels synthesis draws; `read`: the teacher's reading
            images, labels = (torch.cat([drawn[j][n] for j in teachers]) for n in range(2))
            read = torch.cat([noise[j][1] for j in teachers]) == labels
        else:
            images, labels, logits = (torch.cat([parts[j][n] for j in teachers]) for n in range(3))
            read = logits.argmax(1) == labels
        runner.save_dream_grid(images, labels, read, dataset.mean, dataset.std, path, dataset.classes)
        print(f"{path}: {len(images)} images from clients {teachers}, read as dreamed {read.float().mean():.0%}")
    print(f"BN loss at the end of synthesis: {sum(bn_end) / len(bn_end):.2f}")


if __name__ == "__main__":
    main()
