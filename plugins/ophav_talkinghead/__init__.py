"""ophav plugin: talkinghead. Image2Video networks written for the public checkpoints of face-vid2vid (the
zhanglonghao1992 reimplementation, driven by scripted yaw/pitch/roll and named expressions) and the First Order
Motion Model (driven by a driving video). Heavy modules load only when a component is created."""
