"""View specs, the augmentation pipelines and their registry, the image-folder dataset with its resumable sampler, the CIFAR-10 download."""
