"""The README quick start: create, add a task, train a few steps, switch tasks, export a plain timm model."""
import torch
import timm
import timm_modcl  # noqa: F401  registers modcl_* models in timm

model = timm.create_model("modcl_mobilenetv2_100", pretrained=False)  # pretrained=True online
model.add_task("shapes", num_classes=4, resolution=(4, 4))           # new task, now active
opt = torch.optim.Adam(model.parameters(), lr=0.01)                   # exactly the active task's tensors
x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 4, (8,))
model.train()
for _ in range(3):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
model.set_task("base")                              # the backbone's own task, bit-identical to before
plain = model.export_task("shapes")                 # plain timm mobilenetv2_100, modulation folded in
print(model.tasks["shapes"].num_added_params, type(plain).__name__)
