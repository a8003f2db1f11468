output "nat_instance_id" {
  description = "The NAT instance."
  value       = aws_instance.nat.id
}

output "nat_public_ip" {
  description = "The address the private subnet's traffic leaves with."
  value       = aws_eip.nat.public_ip
}

output "nat_network_interface_id" {
  description = "The ENI the private route table's 0.0.0.0/0 points at."
  value       = aws_network_interface.nat.id
}
