"""The backbone, the MLP heads, the multi-task Siamese network and ghost BatchNorm."""
