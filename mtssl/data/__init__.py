"""Views and their augmentations, the image-folder dataset with its resumable sampler, the CIFAR-10 download."""
