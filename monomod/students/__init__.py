"""Student families: NAC, V-MoE and ViT, each a StagedModel."""
