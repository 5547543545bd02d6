// Batched SGEMM, row-major: C[z] (m x n) = A[z] * B[z] (+ C[z] when
// `accumulate`). A[z] is m x k, or stored k x m and read transposed when `ta`;
// B[z] is k x n, or stored n x k when `tb`. `sa`/`sb` are the batch strides
// (0 for a matrix shared by the batch). A 64x64 tile of C per 256-thread
// block, each thread 4x4 outputs strided by 16 to keep shared reads apart.

#define TM 64
#define TN 64
#define TK 16

extern "C" __global__ void sgemm(const float* A, const float* B, float* C, int m, int n, int k, int ta,
                                 int tb, long long sa, long long sb, int accumulate) {
    __shared__ float As[TK][TM + 1];
    __shared__ float Bs[TK][TN + 1];
    A += blockIdx.z * sa;
    B += blockIdx.z * sb;
    C += (long long)blockIdx.z * m * n;
    int row0 = blockIdx.y * TM, col0 = blockIdx.x * TN;
    int tid = threadIdx.x, tr = tid / 16, tc = tid % 16;
    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int p0 = 0; p0 < k; p0 += TK) {
        // Consecutive threads read consecutive addresses of the stored layout.
        for (int l = tid; l < TM * TK; l += blockDim.x) {
            int i = ta ? l % TM : l / TK, p = ta ? l / TM : l % TK;
            int gi = row0 + i, gp = p0 + p;
            float v = 0.f;
            if (gi < m && gp < k) v = ta ? A[(long long)gp * m + gi] : A[(long long)gi * k + gp];
            As[p][i] = v;
        }
        for (int l = tid; l < TN * TK; l += blockDim.x) {
            int j = tb ? l / TK : l % TN, p = tb ? l % TK : l / TN;
            int gj = col0 + j, gp = p0 + p;
            float v = 0.f;
            if (gj < n && gp < k) v = tb ? B[(long long)gj * k + gp] : B[(long long)gp * n + gj];
            Bs[p][j] = v;
        }
        __syncthreads();
        for (int p = 0; p < TK; ++p) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = As[p][tr + 16 * i];
            for (int j = 0; j < 4; ++j) b[j] = Bs[p][tc + 16 * j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        int gi = row0 + tr + 16 * i;
        if (gi >= m) continue;
        for (int j = 0; j < 4; ++j) {
            int gj = col0 + tc + 16 * j;
            if (gj >= n) continue;
            long long o = (long long)gi * n + gj;
            C[o] = accumulate ? C[o] + acc[i][j] : acc[i][j];
        }
    }
}
