"""Model parts of K-Net, registered in Detectron2 registries on import."""
