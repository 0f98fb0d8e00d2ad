"""deploy/kubernetes/envoy/envoy.yaml: the gRPC-aware load balancer agrees with the server's Deployment and Service."""

from pathlib import Path

import yaml

KUBERNETES = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"


def objects(path: Path) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def test_envoy_balances_calls_over_the_headless_services_pods():
    lb = objects(KUBERNETES / "envoy" / "envoy.yaml")
    server = {**objects(KUBERNETES / "deployment.yaml"), **objects(KUBERNETES / "service.yaml")}
    envoy = yaml.safe_load(lb["ConfigMap"]["data"]["envoy.yaml"])
    (cluster,) = envoy["static_resources"]["clusters"]
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    grpc_port = next(p["port"] for p in server["Service"]["spec"]["ports"] if p["name"] == "grpc")
    assert server["Service"]["spec"]["clusterIP"] == "None", "STRICT_DNS needs one record per pod"
    assert (address["address"], address["port_value"]) == (server["Service"]["metadata"]["name"], grpc_port)
    assert cluster["type"] == "STRICT_DNS" and "grpc_health_check" in cluster["health_checks"][0]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"], "gRPC upstreams speak HTTP/2"
    (listener,) = envoy["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"] == {"cluster": cluster["name"], "timeout": "0s"}, "streams must not hit a route deadline"


def test_the_envoy_deployment_mounts_its_config_and_the_service_reaches_it():
    lb = objects(KUBERNETES / "envoy" / "envoy.yaml")
    pod = lb["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["volumes"][0]["configMap"]["name"] == lb["ConfigMap"]["metadata"]["name"]
    assert container["args"] == ["-c", f"{container['volumeMounts'][0]['mountPath']}/envoy.yaml"]
    assert lb["Service"]["spec"]["selector"] == lb["Deployment"]["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    envoy = yaml.safe_load(lb["ConfigMap"]["data"]["envoy.yaml"])
    listen = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert ports[lb["Service"]["spec"]["ports"][0]["targetPort"]] == listen
