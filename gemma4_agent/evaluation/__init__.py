"""Evaluation of the agent: bag replay through the core (`replay`), republishing a bag over ROS 2
with a recorder of the node's outputs (`play`), closed loop in the synthetic world (`closed_loop`),
and the end-to-end demo (`demo`). Reports are JSON + Markdown + PNG plots (`report`, `metrics`)."""
