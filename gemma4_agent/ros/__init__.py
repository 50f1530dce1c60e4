"""ROS 2 adapter for the agent core: a lifecycle node and image conversion.

`params` and `image_convert` import no ROS module, so tools and tests can use them without rclpy;
`node` needs rclpy and the message packages.
"""
