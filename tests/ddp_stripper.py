# torchrun --nproc-per-node 2 ddp_stripper.py   (the README's example; tests/test_distributed.py runs it)
import torch, torch.distributed as dist, torch.nn.functional as F, deadscan
from torch.nn.parallel import DistributedDataParallel

dist.init_process_group("gloo")                  # torchrun gives RANK, WORLD_SIZE and the address
rank, world = dist.get_rank(), dist.get_world_size()
model = deadscan.load("sample_models/mlp_digits.safetensors")
train, val = deadscan.load_data("digits", "train"), deadscan.load_data("digits", "val")
ddp = DistributedDataParallel(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
stripper = deadscan.Stripper(model, opt, rate=0.1)   # the unwrapped model; scans reduce over the default group
g = torch.Generator().manual_seed(0)
for epoch in range(3):
    ddp.train()
    order = torch.randperm(len(train), generator=g)  # the same order in every process
    for i in range(0, len(train) // 64 * 64, 64):   # global batches of 64
        idx = order[i:i + 64][rank::world]           # this process's share
        loss = F.cross_entropy(ddp(train.prepare(train.x[idx])), train.y[idx])
        opt.zero_grad(); loss.backward(); opt.step()
    report = stripper.step(val)                      # the same val everywhere: each scans its share
    if rank == 0:
        print(epoch, report.dead, report.revived_count, round(report.active_percent, 2), report.scan.processes)
dist.barrier()                                   # every process done before any tears its connections down
dist.destroy_process_group()
