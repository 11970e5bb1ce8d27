"""How much does the hypernetwork cost next to local training? (docs/design.md §3; issue: "overhead < 10%")

One server round is: generate the round's clients' weights in one batched call, K local SGD steps on
each client, then the pFedHN vector-Jacobian product and one optimizer step. This script times the
three parts of real rounds (synthetic images of CIFAR size, so no dataset is needed) and prints the
hypernetwork's share: (generation + update) / (generation + local training + update).

    python benchmarks/overhead.py                      # width 64 and 16, 2 clients x 10 local steps
    python benchmarks/overhead.py --widths 16 --local-steps 50 --clients 5
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import federated as fl  # noqa: E402
import hypernet as hn  # noqa: E402
import masks  # noqa: E402


def fake_dataset(device, n=512, num_classes=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(device)
    y = torch.randint(0, num_classes, (n,), generator=g).to(device)
    return SimpleNamespace(x_train=x, y_train=y, x_test=x, y_test=y, num_classes=num_classes,
                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_round(width, clients_per_round, local_steps, device, rounds=2):
    dataset = fake_dataset(device)
    model = hn.ResNet18(10, width).to(device)
    gates = masks.BatchGates(1, 3, 128, clients_per_round)
    net = hn.HyperNetwork(model, clients_per_round, gates=gates).to(device)
    server = fl.Server(net, model, [list(range(clients_per_round))])
    server.begin_stage(0)
    split = SimpleNamespace(train=torch.arange(512, device=device), val=torch.arange(0, device=device),
                            test=torch.arange(64, device=device), classes=list(range(10)))
    clients = [fl.Client(c, dataset, split, model, net.unflatten, net.flatten, seed=0)
               for c in range(clients_per_round)]
    ids = list(range(clients_per_round))
    timings = []
    for r in range(rounds + 1):                    # round 0 warms up allocators and kernels
        sync(device); t0 = time.perf_counter()
        flat = net(ids, [0] * len(ids), s=gates.scale(0.5))
        sync(device); t1 = time.perf_counter()
        updates = [clients[c].local_train(flat[c], server.bn_stats[c], local_steps, 64, 0.05) for c in ids]
        sync(device); t2 = time.perf_counter()
        grads = hn.pfedhn_gradients(flat, torch.stack([u.delta for u in updates]), server.params)
        grads, _ = hn.clip_gradients(grads, 50.0)
        server.optimizer.step(grads, server.free)
        sync(device); t3 = time.perf_counter()
        if r > 0:
            timings.append((t1 - t0, t2 - t1, t3 - t2))
    generate, local, update = (sum(t[i] for t in timings) / len(timings) for i in range(3))
    return generate, local, update, hn.count_parameters(model), hn.count_parameters(net)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", default="64,16")
    p.add_argument("--clients", type=int, default=2, help="clients per round")
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    print(f"device {device}, {args.clients} clients x {args.local_steps} local steps (batch 64) per round")
    print("width | target params | hypernet params | generate s | local train s | update s | hypernet share")
    for width in [int(w) for w in args.widths.split(",")]:
        g, l, u, n_target, n_hyper = time_round(width, args.clients, args.local_steps, device)
        share = (g + u) / (g + l + u)
        print(f"{width:5d} | {n_target / 1e6:10.2f} M | {n_hyper / 1e6:12.2f} M | {g:10.3f} | {l:13.3f} | "
              f"{u:8.3f} | {100 * share:6.2f} %")


if __name__ == "__main__":
    main()
