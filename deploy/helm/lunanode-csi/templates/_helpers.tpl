{{/*
Fixed identifiers of the driver. They are compiled into the lunanode-csi
binary, so they are constants here rather than values.
*/}}
{{- define "lunanode-csi.driverName" -}}
csi.lunanode.com
{{- end }}

{{- define "lunanode-csi.topologyKey" -}}
topology.csi.lunanode.com/region
{{- end }}

{{/* Directory of the CSI socket inside every pod of the chart. */}}
{{- define "lunanode-csi.socketDir" -}}
/csi
{{- end }}

{{- define "lunanode-csi.socketPath" -}}
{{ include "lunanode-csi.socketDir" . }}/csi.sock
{{- end }}

{{- define "lunanode-csi.endpoint" -}}
unix://{{ include "lunanode-csi.socketPath" . }}
{{- end }}

{{/* Where the node plugin's socket lives on the host. */}}
{{- define "lunanode-csi.pluginDir" -}}
{{ trimSuffix "/" .Values.node.kubeletDir }}/plugins/{{ include "lunanode-csi.driverName" . }}
{{- end }}

{{- define "lunanode-csi.registrationDir" -}}
{{ trimSuffix "/" .Values.node.kubeletDir }}/plugins_registry
{{- end }}

{{/* Mount point of the credentials Secret in the controller's driver container. */}}
{{- define "lunanode-csi.credentialsDir" -}}
/etc/lunanode
{{- end }}

{{- define "lunanode-csi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix: the release name, unless it lacks the chart name.
Kept to 50 characters so that suffixes like "-controller" still fit 63.
*/}}
{{- define "lunanode-csi.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lunanode-csi.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lunanode-csi.labels" -}}
helm.sh/chart: {{ include "lunanode-csi.chart" . }}
{{ include "lunanode-csi.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lunanode-csi
{{- end }}

{{- define "lunanode-csi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lunanode-csi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lunanode-csi.controllerSelectorLabels" -}}
{{ include "lunanode-csi.selectorLabels" . }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "lunanode-csi.nodeSelectorLabels" -}}
{{ include "lunanode-csi.selectorLabels" . }}
app.kubernetes.io/component: node
{{- end }}

{{- define "lunanode-csi.controllerServiceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "lunanode-csi.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lunanode-csi.nodeServiceAccountName" -}}
{{- if .Values.node.serviceAccount.create }}
{{- default (printf "%s-node" (include "lunanode-csi.fullname" .)) .Values.node.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.node.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lunanode-csi.credentialsSecretName" -}}
{{- if .Values.credentials.existingSecret }}
{{- .Values.credentials.existingSecret }}
{{- else }}
{{- printf "%s-credentials" (include "lunanode-csi.fullname" .) }}
{{- end }}
{{- end }}

{{/* Render "repository:tag" of an image entry; pass (dict "image" ... "default" ...). */}}
{{- define "lunanode-csi.image" -}}
{{- printf "%s:%s" .image.repository (default .default .image.tag | toString) }}
{{- end }}

{{- define "lunanode-csi.driverImage" -}}
{{ include "lunanode-csi.image" (dict "image" .Values.image.driver "default" .Chart.AppVersion) }}
{{- end }}

{{- define "lunanode-csi.sidecarImage" -}}
{{ include "lunanode-csi.image" (dict "image" . "default" "") }}
{{- end }}

{{/* Hardened security context for the unprivileged containers. */}}
{{- define "lunanode-csi.restrictedContainerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end }}

{{/*
The controller's default region, which also checks the region settings: a
single-region install needs `region` (Helm's `required` fails the install
without it), a multi-region one lists node.regions and `region`, if set, must
be among them. Every template that depends on the regions includes this, so a
missing region fails `helm install` before anything reaches the cluster.
*/}}
{{- define "lunanode-csi.defaultRegion" -}}
{{- $regions := .Values.node.regions | default list -}}
{{- if $regions -}}
{{- if and .Values.region (not (has .Values.region $regions)) -}}
{{- fail (printf "region %q is not one of node.regions %v: the controller's default region must be one the nodes are in" .Values.region $regions) -}}
{{- end -}}
{{- default (first $regions) .Values.region -}}
{{- else -}}
{{- required "region is required: set it to the Luna Node region of the cluster's nodes (--set region=toronto, montreal or roubaix), or list the regions in node.regions for a multi-region cluster. The node plugin holds no API credentials to ask the cloud, and a node without a region would register no topology, leaving every claim Pending." .Values.region -}}
{{- end -}}
{{- end }}

{{/*
The regions that get a node DaemonSet, as a JSON list: node.regions, else the
one `region`.
*/}}
{{- define "lunanode-csi.nodeRegions" -}}
{{- $default := include "lunanode-csi.defaultRegion" . -}}
{{- (.Values.node.regions | default (list $default)) | toJson -}}
{{- end }}

{{/*
The tuning flags of a controller sidecar (provisioner, attacher, resizer,
snapshotter), from its block under `sidecars`: the CSI call timeout, the
Kubernetes client rate, workers, retry intervals, the leader-election timings
and extraArgs. A null value leaves the sidecar's own default.
Arguments: s (the sidecar's values), le (sidecars.leaderElection), timeout
(sidecars.timeout), workersFlag (the sidecar's name for its worker count).
*/}}
{{- define "lunanode-csi.sidecarTuning" -}}
{{- $s := .s -}}
- --timeout={{ default .timeout $s.timeout }}
{{- if not (kindIs "invalid" $s.kubeApiQps) }}
- --kube-api-qps={{ $s.kubeApiQps }}
{{- end }}
{{- if not (kindIs "invalid" $s.kubeApiBurst) }}
- --kube-api-burst={{ $s.kubeApiBurst }}
{{- end }}
{{- if not (kindIs "invalid" $s.workers) }}
- {{ .workersFlag }}={{ $s.workers }}
{{- end }}
{{- with $s.retryIntervalStart }}
- --retry-interval-start={{ . }}
{{- end }}
{{- with $s.retryIntervalMax }}
- --retry-interval-max={{ . }}
{{- end }}
{{- with .le.leaseDuration }}
- --leader-election-lease-duration={{ . }}
{{- end }}
{{- with .le.renewDeadline }}
- --leader-election-renew-deadline={{ . }}
{{- end }}
{{- with .le.retryPeriod }}
- --leader-election-retry-period={{ . }}
{{- end }}
{{- with $s.extraArgs }}
{{ toYaml . }}
{{- end }}
{{- end }}
