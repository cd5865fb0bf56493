import sys, time, torch, argparse
import common as C
p = argparse.ArgumentParser(); C.add_common_args(p, epochs=3, batch_size=64, lr=0.05)
args = C.parse_args(p, ["--train-size","3000","--test-size","600","--image-size","32","--out-dir","/tmp/run_try","--force"] + sys.argv[1:])
run_dir, device = C.setup(args, "try")
data = C.load_data(args)
model = C.to_device_model(C.CifarResNet(1, data.num_classes), device)
opt = C.make_sgd(model.parameters(), args.lr)
step = C.make_train_step(model, C.cross_entropy_loss, opt, device=device)
loader = C.GpuLoader(data.train.images, data.train.labels, args.batch_size, device=device, mean=data.mean, std=data.std, train=True, crop_pad=4, flip=True)
test = C.GpuLoader(data.test.images, data.test.labels, 256, device=device, mean=data.mean, std=data.std)
def ev(e):
    s, y = C.predict(model, test, device=device)
    return {"test_acc": C.accuracy(s, y), **{f"acc_{k}": v for k, v in C.level_accuracies(s, y, data.hierarchy).items()}}
t=time.time()
h = C.fit(run_dir, model, opt, step, loader, epochs=args.epochs, lr_at=C.piecewise_lr([], [args.lr]), evaluate=ev, log_path=run_dir/"metrics.jsonl")
print(time.time()-t)
