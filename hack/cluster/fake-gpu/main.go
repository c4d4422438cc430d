// Command fake-gpu is the one stand-in of the test cluster: a device plugin that registers a few
// nvidia.com/gpu devices with the kubelet through the real device-plugin gRPC API (v1beta1), so the real
// scheduler and kubelet admit FLUX pods that ask for GPUs. There is no GPU: the "devices" are names, and a
// container that gets one sees NVIDIA_VISIBLE_DEVICES and DFK8S_FAKE_GPU set to it, nothing else.
//
// Usage: fake-gpu -dir /var/lib/kubelet/device-plugins [-count 2] [-resource nvidia.com/gpu]
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

type plugin struct {
	pluginapi.UnimplementedDevicePluginServer
	devices []*pluginapi.Device
}

func (p *plugin) GetDevicePluginOptions(context.Context, *pluginapi.Empty) (*pluginapi.DevicePluginOptions, error) {
	return &pluginapi.DevicePluginOptions{}, nil
}

func (p *plugin) ListAndWatch(_ *pluginapi.Empty, stream grpc.ServerStreamingServer[pluginapi.ListAndWatchResponse]) error {
	if err := stream.Send(&pluginapi.ListAndWatchResponse{Devices: p.devices}); err != nil {
		return err
	}
	<-stream.Context().Done() // the devices never change
	return nil
}

func (p *plugin) Allocate(_ context.Context, req *pluginapi.AllocateRequest) (*pluginapi.AllocateResponse, error) {
	resp := &pluginapi.AllocateResponse{}
	for _, c := range req.ContainerRequests {
		ids := strings.Join(c.DevicesIds, ",")
		log.Printf("allocated %s", ids)
		resp.ContainerResponses = append(resp.ContainerResponses, &pluginapi.ContainerAllocateResponse{
			Envs: map[string]string{"NVIDIA_VISIBLE_DEVICES": ids, "DFK8S_FAKE_GPU": ids},
		})
	}
	return resp, nil
}

func (p *plugin) PreStartContainer(context.Context, *pluginapi.PreStartContainerRequest) (*pluginapi.PreStartContainerResponse, error) {
	return &pluginapi.PreStartContainerResponse{}, nil
}

func (p *plugin) GetPreferredAllocation(context.Context, *pluginapi.PreferredAllocationRequest) (*pluginapi.PreferredAllocationResponse, error) {
	return &pluginapi.PreferredAllocationResponse{}, nil
}

func main() {
	dir := flag.String("dir", "", "the kubelet's device-plugins folder (holds kubelet.sock)")
	count := flag.Int("count", 2, "devices to register")
	resource := flag.String("resource", "nvidia.com/gpu", "extended resource name")
	flag.Parse()
	if *dir == "" {
		log.Fatal("-dir is required")
	}
	p := &plugin{}
	for i := 0; i < *count; i++ {
		p.devices = append(p.devices, &pluginapi.Device{ID: fmt.Sprintf("fake-gpu-%d", i), Health: pluginapi.Healthy})
	}
	endpoint := "dfk8s-fake-gpu.sock"
	sock := filepath.Join(*dir, endpoint)
	// The kubelet empties its device-plugins folder when it starts, our socket included: each
	// registration serves on a socket made anew.
	var server *grpc.Server
	serve := func() {
		if server != nil {
			server.Stop()
		}
		_ = os.Remove(sock)
		listener, err := net.Listen("unix", sock)
		if err != nil {
			log.Fatalf("listen %s: %v", sock, err)
		}
		server = grpc.NewServer()
		pluginapi.RegisterDevicePluginServer(server, p)
		go func(s *grpc.Server) { _ = s.Serve(listener) }(server)
	}
	defer func() {
		if server != nil {
			server.Stop()
		}
		_ = os.Remove(sock)
	}()

	// Register with the kubelet; again whenever it restarts (its socket is made anew).
	register := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		conn, err := grpc.NewClient("unix://"+filepath.Join(*dir, "kubelet.sock"),
			grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = pluginapi.NewRegistrationClient(conn).Register(ctx, &pluginapi.RegisterRequest{
			Version: pluginapi.Version, Endpoint: endpoint, ResourceName: *resource,
		})
		return err
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	var registered os.FileInfo
	for {
		kubelet, statErr := os.Stat(filepath.Join(*dir, "kubelet.sock"))
		if statErr == nil && (registered == nil || !os.SameFile(registered, kubelet)) {
			serve()
			if err := register(); err != nil {
				log.Printf("register: %v (retrying)", err)
			} else {
				log.Printf("registered %d %s devices", *count, *resource)
				registered = kubelet
			}
		}
		select {
		case <-stop:
			return
		case <-time.After(time.Second):
		}
	}
}
