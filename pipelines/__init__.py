"""The KFP pipeline wiring the stage components, its compiler and its local runner."""
