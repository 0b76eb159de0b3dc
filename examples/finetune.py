"""Train a SkipNet stage. Thin entry point into ``timm_skipnet.train`` (flags: ``--help``).

    accelerate launch examples/finetune.py --model skipnet_resnet38_cifar --dataset ../shared/data/cifar10/plain \
        --stage sp --initial-checkpoint runs/base/model --lr 0.01 --epochs 10 --output runs/sp
    python examples/finetune.py --model resnet50d --pretrained --dataset ILSVRC/imagenet-1k --stage sp ...
"""
from timm_skipnet.train import main

if __name__ == '__main__':
    main()
