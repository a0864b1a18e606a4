"""The protected pair: colo-node and the pair's discovery endpoint."""
